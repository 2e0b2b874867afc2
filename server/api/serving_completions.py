"""``POST /v1/completions``: one text or token-id prompt, straight to the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.protocol import GenerationEvent, GenerationRequest, TokenLogprob

from .errors import APIError
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_engine import SSE_HEADERS, OpenAIServing


class OpenAIServingCompletion(OpenAIServing):
    request_prefix = "cmpl"

    async def create(self, req: CompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        bank = self.resolve_bank(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of must be 1, got {req.best_of}", param="best_of")
        prompt_ids = await self.run_blocking(self._prompt_ids, req.prompt)
        params = self.sampling_params(req, len(prompt_ids), req.max_tokens, req.logprobs, "prompt")
        gen = GenerationRequest(self.new_id(), prompt_ids, params, bank=bank)
        model = req.model or self.ctx.model_name
        first, events = await self.start(http, gen)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, model, first, events, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.until_disconnect(http, gen.request_id, self._full(gen, model, first, events))

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            self.check_token_ids(ids, "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def _logprobs(self, items: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in items or ():
            token = self.token_text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            top = {self.token_text(tid): v for tid, v in lp.top}
            top.setdefault(token, lp.logprob)  # OpenAI's top_logprobs include the sampled token
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    async def _full(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                    events: AsyncIterator[GenerationEvent]) -> CompletionResponse:
        texts, n_tokens, event = [], 0, first
        logprobs = CompletionLogprobs() if gen.params.logprobs is not None else None
        offset = 0
        try:
            while True:
                texts.append(event.text)
                n_tokens += len(event.token_ids)
                if logprobs is not None and event.logprobs:
                    part = self._logprobs(event.logprobs, offset)
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(logprobs, key).extend(getattr(part, key))
                    offset = part.text_offset[-1] + len(part.tokens[-1]) if part.tokens else offset
                if event.finished:
                    break
                event = await events.__anext__()
        finally:
            await events.aclose()
        self.check_final(event)
        return CompletionResponse(
            id=gen.request_id, model=model,
            choices=[CompletionChoice(text="".join(texts), logprobs=logprobs, finish_reason=event.finish_reason)],
            usage=self.usage(event, len(gen.prompt_token_ids), n_tokens),
        )

    def _stream(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                events: AsyncIterator[GenerationEvent], include_usage: bool) -> AsyncIterator[str]:
        offset = 0  # text_offset of the next token, carried across chunks

        def logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
            nonlocal offset
            part = self._logprobs(lps, offset)
            offset = part.text_offset[-1] + len(part.tokens[-1]) if part.tokens else offset
            return part.model_dump()

        return self.stream_sse(gen, model, first, events, include_usage, obj="text_completion",
                               choice=lambda text, final: {"text": text}, logprobs=logprobs)
