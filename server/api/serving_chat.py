"""``POST /v1/chat/completions``: messages through the model's chat template, then the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.protocol import MAX_LOGPROBS, GenerationEvent, GenerationRequest, TokenLogprob
from server.multimodal.inputs import ImageInput, MultiModalSpec

from .banks import bank_infos
from .errors import APIError
from .images import ChatImages, PreparedImage, check_marker_free, image_parts, render_content, tokenize_with_images
from .protocol import (AssistantMessage, ChatChoice, ChatChoiceLogprobs, ChatCompletionRequest, ChatCompletionResponse,
                       ChatTokenLogprob, TopLogprob)
from .serving_engine import SSE_HEADERS, OpenAIServing, ServingContext


class OpenAIServingChat(OpenAIServing):
    request_prefix = "chatcmpl"

    def __init__(self, ctx: ServingContext):
        super().__init__(ctx)
        self.images = ChatImages(ctx.engine, ctx.media)

    async def create(self, req: ChatCompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        bank = self.resolve_bank(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs")
        self._check_size(req)
        parts = image_parts(req.messages)
        spec, images = None, []
        if parts:
            spec = self.images.check(parts, bank, {b.name: b.kind for b in bank_infos(self.ctx.banks)})
            check_marker_free(req.messages, spec.image_token)
            images = await self.images.load(parts, spec)  # on the media threads
        prompt_ids, image_inputs = await self.run_blocking(self._render, req, spec, images)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, len(prompt_ids), max_tokens, logprobs, "messages")
        gen = GenerationRequest(self.new_id(), prompt_ids, params, bank=bank, images=image_inputs, n=req.n or 1)
        model = req.model or self.ctx.model_name
        first, events = await self.start(http, gen)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, model, first, events, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.until_disconnect(http, gen.request_id, self._full(gen, model, first, events, req.logprobs))

    def _check_size(self, req: ChatCompletionRequest) -> None:
        """Cheap refusals before the template renders: too many messages, or more text than the
        context window can hold whatever the tokenizer makes of it (each token covers at most
        ``max_chars_per_token`` characters)."""
        most = self.ctx.max_messages
        if most is not None and len(req.messages) > most:
            raise APIError(400, f"{len(req.messages)} messages is more than this server's limit of {most} "
                                "(--max-messages)", param="messages")
        per_token = self.ctx.tokenizers.max_chars_per_token
        if per_token:
            chars = sum(len(m.content) if isinstance(m.content, str)
                        else sum(len(p.text or "") for p in m.content or ()) for m in req.messages)
            if chars > self.ctx.max_model_len * per_token:
                raise APIError(400, f"the messages hold {chars} characters: more than {self.ctx.max_model_len} tokens "
                                    f"(this model's maximum context length) can cover", param="messages",
                               code="context_length_exceeded")

    def _render(self, req: ChatCompletionRequest, spec: MultiModalSpec | None,
                images: list[PreparedImage]) -> tuple[list[int], list[ImageInput]]:
        """The chat template's prompt as token ids, and the images' placeholder spans in it."""
        marker = spec.image_token if images else None
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": render_content(m.content, marker)}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template rejects a conversation (jinja raise_exception)
            raise APIError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        if images:
            return tokenize_with_images(self.tokenizer, text, images, spec)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), []

    def _logprobs(self, items: list[TokenLogprob] | None) -> list[ChatTokenLogprob]:
        out = []
        for lp in items or ():
            token = self.token_text(lp.token_id)
            top = [TopLogprob(token=(t := self.token_text(tid)), logprob=v, bytes=list(t.encode())) for tid, v in lp.top]
            out.append(ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top))
        return out

    async def _full(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                    events: AsyncIterator[GenerationEvent], want_logprobs: bool | None) -> ChatCompletionResponse:
        by_index = await self.collect(gen, first, events)
        choices = []
        for index, evs in enumerate(by_index):
            logprobs = [x for e in evs for x in self._logprobs(e.logprobs)] if want_logprobs else None
            choices.append(ChatChoice(index=index, message=AssistantMessage(content="".join(e.text for e in evs)),
                                      finish_reason=evs[-1].finish_reason,
                                      logprobs=ChatChoiceLogprobs(content=logprobs) if want_logprobs else None))
        n_tokens = sum(len(e.token_ids) for evs in by_index for e in evs)
        return ChatCompletionResponse(id=gen.request_id, model=model, choices=choices,
                                      usage=self.usage([evs[-1] for evs in by_index], len(gen.prompt_token_ids), n_tokens))

    def _stream(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                events: AsyncIterator[GenerationEvent], include_usage: bool) -> AsyncIterator[str]:
        return self.stream_sse(
            gen, model, first, events, include_usage, obj="chat.completion.chunk",
            choice=lambda text, final: {"delta": {"content": text} if text or not final else {}},
            logprobs=lambda index, lps: {"content": [x.model_dump() for x in self._logprobs(lps)]},
            preamble={"delta": {"role": "assistant", "content": ""}})
