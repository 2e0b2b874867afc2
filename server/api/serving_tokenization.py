"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the server's tokenizer (and chat template), without
generating. ``/tokenize`` takes ``prompt`` text or chat ``messages`` (rendered exactly as
``/v1/chat/completions`` renders them, tools included)."""

from __future__ import annotations

from . import tools
from .errors import APIError
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving_chat import OpenAIServingChat
from .serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, ctx, chat: OpenAIServingChat):
        super().__init__(ctx)
        self.chat = chat

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.resolve_bank(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            plan = tools.plan(req.tools, None)
            ids, _ = await self.chat.run_blocking(self.chat._render, req, plan, None, [], req.add_generation_prompt)
        else:
            ids = await self.run_blocking(
                lambda: list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]))
        strs = [self.token_text(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_bank(req.model)
        self.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=await self.run_blocking(lambda ids: self.tokenizer.decode(ids), req.tokens))
