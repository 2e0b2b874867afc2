"""``POST /v1/chat/completions``: messages (and tools) through the model's chat template, then the engine.

Structured outputs (``response_format``, vLLM's ``guided_*``) constrain the output; ``tools`` /
``tool_choice`` are planned by tools.py and the output's tool calls parsed by the
``--tool-call-parser`` (tool_parsers.py), whole or as streamed ``tool_calls`` deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.protocol import MAX_LOGPROBS, GenerationEvent, GenerationRequest, TokenLogprob
from server.multimodal.inputs import ImageInput, MultiModalSpec

from . import structured_outputs, tools
from .banks import bank_infos
from .errors import APIError
from .images import ChatImages, PreparedImage, check_marker_free, image_parts, render_content, tokenize_with_images
from .protocol import (AssistantMessage, ChatChoice, ChatChoiceLogprobs, ChatCompletionRequest, ChatCompletionResponse,
                       ChatTokenLogprob, ToolCall, TopLogprob, UsageInfo)
from .serving_engine import SSE_HEADERS, ChoiceStream, OpenAIServing, ServingContext, gather_choices, sum_usage
from .tool_parsers import ParsedCall, get_parser


class OpenAIServingChat(OpenAIServing):
    request_prefix = "chatcmpl"

    def __init__(self, ctx: ServingContext):
        super().__init__(ctx)
        self.images = ChatImages(ctx.engine, ctx.media)

    async def create(self, req: ChatCompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        bank = self.resolve_bank(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs")
        self._check_size(req)
        n, _ = self.num_choices(req.n)
        plan = tools.plan(req.tools, req.tool_choice)
        structured, structured_param = structured_outputs.from_request(req)
        if plan.structured is not None:
            if structured is not None:
                raise APIError(400, f"tool_choice {plan.mode!r} constrains the output; it cannot be combined with "
                                    f"{structured_param}", param="tool_choice")
            structured, structured_param = plan.structured, "tools"
        if structured is not None:
            await self.run_blocking(structured_outputs.check, structured, structured_param)
        parts = image_parts(req.messages)
        spec, images = None, []
        if parts:
            spec = self.images.check(parts, bank, {b.name: b.kind for b in bank_infos(self.ctx.banks)})
            check_marker_free(req.messages, spec.image_token)
            images = await self.images.load(parts, spec)  # on the media threads
        prompt_ids, image_inputs = await self.run_blocking(self._render, req, plan, spec, images)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, len(prompt_ids), max_tokens, logprobs, "messages")
        params.structured = structured
        gen = GenerationRequest(self.new_id(), prompt_ids, params, bank=bank, images=image_inputs, n=n)
        model = req.model or self.ctx.model_name
        started = await self.start_all(http, [gen])  # one (first event, the rest) per choice
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            choices = [self._choice_stream(j, gen, first, events, plan) for j, (first, events) in enumerate(started)]
            return StreamingResponse(self.stream_sse(gen.request_id, model, choices, include_usage,
                                                     obj="chat.completion.chunk"),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        async def collect() -> ChatCompletionResponse:
            results = await gather_choices([self._full(j, gen, first, events, req.logprobs, plan)
                                            for j, (first, events) in enumerate(started)])
            return ChatCompletionResponse(id=gen.request_id, model=model, choices=[c for c, _ in results],
                                          usage=sum_usage([u for _, u in results]))

        try:
            return await self.until_disconnect(http, gen.request_id, collect())
        finally:
            await asyncio.gather(*(events.aclose() for _, events in started), return_exceptions=True)

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

    def _render(self, req: Any, plan: tools.ToolPlan, spec: MultiModalSpec | None = None,
                images: list[PreparedImage] = (), add_generation_prompt: bool = True
                ) -> tuple[list[int], list[ImageInput]]:
        """The chat template's prompt as token ids (tools under ``plan``), and the images' placeholder
        spans in it; ``req`` is a chat or a /tokenize request."""
        marker = spec.image_token if images else None
        messages = []
        for m in req.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                       "content": render_content(m.content, marker)}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        native = tools.template_uses_tools(self.tokenizer)
        messages = tools.render_history(messages, plan.tools, native)
        extra = {"tools": plan.tools} if native and plan.tools else {}
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                      **extra)
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

    def _tool_output(self, text: str, plan: tools.ToolPlan) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output under the request's tool plan."""
        if plan.mode == "named":
            return None, [ParsedCall(plan.named, text)]
        if plan.mode == "required":
            calls = tools.calls_from_required(text)
            return (None if calls else text), calls
        parser = get_parser(self.ctx.tool_call_parser) if plan.mode == "auto" else None
        return parser.parse(text) if parser is not None else (text, [])

    async def _full(self, index: int, gen: GenerationRequest, first: GenerationEvent,
                    events: AsyncIterator[GenerationEvent], want_logprobs: bool | None,
                    plan: tools.ToolPlan) -> tuple[ChatChoice, UsageInfo]:
        """One choice, collected: (its ChatChoice, its usage; the prompt counted by choice 0 only)."""
        texts, logprobs, n_tokens, event = [], [], 0, first
        try:
            while True:
                texts.append(event.text)
                n_tokens += len(event.token_ids)
                if want_logprobs:
                    logprobs.extend(self._logprobs(event.logprobs))
                if event.finished:
                    break
                event = await events.__anext__()
        finally:
            await events.aclose()
        self.check_final(event)
        content, calls = self._tool_output("".join(texts), plan)
        finish = event.finish_reason
        if calls and plan.mode != "named" and finish in ("stop", "length"):  # a call parsed: it completed
            finish = "tool_calls"
        message = AssistantMessage(content=content if calls else (content or ""),
                                   tool_calls=[ToolCall(**c.as_openai()) for c in calls])
        choice = ChatChoice(index=index, message=message, finish_reason=finish,
                            logprobs=ChatChoiceLogprobs(content=logprobs) if want_logprobs else None)
        return choice, self.usage(event, len(gen.prompt_token_ids), n_tokens, count_prompt=index == 0)

    def _choice_stream(self, index: int, gen: GenerationRequest, first: GenerationEvent,
                       events: AsyncIterator[GenerationEvent], plan: tools.ToolPlan) -> ChoiceStream:
        """Content deltas as they come; tool calls as ``tool_calls`` deltas: a named function's
        arguments stream as they are generated, a parsed call is sent whole once its block closes,
        ``required``'s calls when the output is complete."""
        parser = get_parser(self.ctx.tool_call_parser) if plan.mode == "auto" else None
        stream = parser.streamer() if parser is not None else None
        held: list[str] = []  # required: the JSON array, parsed at the end
        named_id = ParsedCall(plan.named or "", "").id
        sent_calls = 0

        def delta(content: str | None = None, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            d: dict[str, Any] = {}
            if content:
                d["content"] = content
            if calls:
                d["tool_calls"] = calls
            return {"delta": d}

        def content(text: str, final: bool) -> dict[str, Any] | None:
            nonlocal sent_calls
            if plan.mode == "named":
                if sent_calls == 0:  # the first chunk names the call; later ones add to its arguments
                    sent_calls = 1
                    return delta(calls=[{"index": 0, "id": named_id, "type": "function",
                                         "function": {"name": plan.named, "arguments": text}}])
                return delta(calls=[{"index": 0, "function": {"arguments": text}}]) if text or final else None
            if plan.mode == "required":
                held.append(text)
                if not final:
                    return None
                calls = tools.calls_from_required("".join(held))
                body = [{"index": i, **c.as_openai()} for i, c in enumerate(calls)]
                sent_calls = len(body)
                return delta(None if calls else "".join(held), body)
            if stream is None:
                return delta(text) if text or final else None
            out, calls = stream.feed(text, final)
            body = [{"index": sent_calls + i, **c.as_openai()} for i, c in enumerate(calls)]
            sent_calls += len(body)
            return delta(out, body) if out or body or final else None

        def finish_reason(reason: str | None) -> str | None:
            return ("tool_calls" if sent_calls and plan.mode in ("auto", "required") and reason in ("stop", "length")
                    else reason)

        return ChoiceStream(index, gen, first, events, content=content, counts_prompt=index == 0,
                            logprobs=lambda lps: {"content": [x.model_dump() for x in self._logprobs(lps)]},
                            empty={"delta": {}}, preamble={"delta": {"role": "assistant", "content": ""}},
                            finish_reason=finish_reason)
