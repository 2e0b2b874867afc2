"""``POST /v1/completions``: one text or token-id prompt, straight to the engine.

``echo``: the prompt comes back before the completion, and with ``logprobs`` = k its tokens' log-
probabilities too (the first token's is null: nothing precedes it), each with its k most likely
alternatives; ``max_tokens: 0`` with ``echo`` scores the prompt and generates nothing (what
loglikelihood evaluation, e.g. lm-evaluation-harness's OpenAI completions model, sends).

``n`` choices, or ``best_of`` >= n of which the n with the highest cumulative log-probability are
returned (not streamed, as OpenAI's), all from one prompt pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.protocol import GenerationEvent, GenerationRequest, TokenLogprob, Usage

from .errors import APIError
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_engine import SSE_HEADERS, OpenAIServing


class OpenAIServingCompletion(OpenAIServing):
    request_prefix = "cmpl"

    async def create(self, req: CompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        bank = self.resolve_bank(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        n = req.n or 1
        best_of = n if req.best_of is None else req.best_of
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
        if best_of > n and req.stream:
            raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
        prompt_ids = await self.run_blocking(self._prompt_ids, req.prompt)
        score_only = req.echo and req.max_tokens == 0  # the engine makes one token, which is dropped
        params = self.sampling_params(req, len(prompt_ids), 1 if score_only else req.max_tokens, req.logprobs,
                                      "prompt")
        params.prompt_logprobs = req.echo and req.logprobs is not None
        if best_of > n and params.logprobs is None:
            params.logprobs = 0  # the sampled tokens' log-probabilities rank the candidates; not returned
        gen = GenerationRequest(self.new_id(), prompt_ids, params, bank=bank, n=best_of)
        model = req.model or self.ctx.model_name
        first, events = await self.start(http, gen)
        echo = None
        if req.echo:
            text = req.prompt if isinstance(req.prompt, str) else (
                req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str)
                else await self.run_blocking(lambda ids: self.tokenizer.decode(ids), prompt_ids))
            echo = (text, self._prompt_logprobs(prompt_ids, first) if params.prompt_logprobs else None)
        if score_only:
            first, events = await self._drop_generated(gen, first, events)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, model, first, events, include_usage, echo),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.until_disconnect(http, gen.request_id, self._full(
            gen, model, first, events, echo, n=n, want_logprobs=req.logprobs is not None))

    def _prompt_logprobs(self, prompt_ids: list[int], first: GenerationEvent) -> CompletionLogprobs:
        """The echoed prompt's logprobs object: one entry per prompt token, the first without a value."""
        out = CompletionLogprobs()
        values = first.prompt_logprobs or []
        tops = first.prompt_top or []
        offset = 0
        for i, tid in enumerate(prompt_ids):
            token = self.token_text(tid)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            if i == 0 or i - 1 >= len(values):
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(values[i - 1])
            top = {self.token_text(t): v for t, v in (tops[i - 1] if i - 1 < len(tops) else ())}
            top.setdefault(token, values[i - 1])
            out.top_logprobs.append(top)
        return out

    @staticmethod
    async def _drop_generated(gen: GenerationRequest, first: GenerationEvent, events: AsyncIterator[GenerationEvent]
                              ) -> tuple[GenerationEvent, AsyncIterator[GenerationEvent]]:
        """``echo`` with ``max_tokens: 0``: wait for the one token each choice made and answer without it."""
        finals: list[GenerationEvent] = []
        event = first
        try:
            while True:
                if event.finished:
                    finals.append(event)
                    if len(finals) == gen.n:
                        break
                event = await events.__anext__()
        finally:
            await events.aclose()
        done = [GenerationEvent(request_id=gen.request_id, index=e.index, finished=True,
                                finish_reason="length" if e.finish_reason in ("length", "stop") else e.finish_reason,
                                error=e.error, usage=Usage(len(gen.prompt_token_ids), 0)) for e in finals]

        async def rest() -> AsyncIterator[GenerationEvent]:
            for e in done[1:]:
                yield e

        return done[0], rest()

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
                    events: AsyncIterator[GenerationEvent], echo: tuple | None = None, *, n: int = 1,
                    want_logprobs: bool = True) -> CompletionResponse:
        """The response; with best_of (``gen.n``) > ``n``, the n candidates of the highest cumulative
        log-probability, best first (usage counts every candidate's tokens, as OpenAI bills them)."""
        by_index = await self.collect(gen, first, events)
        if len(by_index) > n:
            def score(evs: list[GenerationEvent]) -> float:
                return sum(lp.logprob for e in evs for lp in (e.logprobs or ()))
            ranked = sorted(by_index, key=score, reverse=True)[:n]
        else:
            ranked = by_index
        choices = [CompletionChoice(index=i, text=text, logprobs=lp if want_logprobs else None,
                                    finish_reason=evs[-1].finish_reason)
                   for i, evs in enumerate(ranked) for text, lp in [self._choice(gen, evs, echo)]]
        n_tokens = sum(len(e.token_ids) for evs in by_index for e in evs)
        return CompletionResponse(id=gen.request_id, model=model, choices=choices,
                                  usage=self.usage([evs[-1] for evs in by_index], len(gen.prompt_token_ids), n_tokens))

    def _choice(self, gen: GenerationRequest, evs: list[GenerationEvent], echo: tuple | None
                ) -> tuple[str, CompletionLogprobs | None]:
        """One choice's text and logprobs object from its events (after the echoed prompt, if any)."""
        texts = []
        logprobs = CompletionLogprobs() if gen.params.logprobs is not None else None
        offset = 0
        if echo is not None:
            texts.append(echo[0])
            if logprobs is not None and echo[1] is not None:
                logprobs = echo[1].model_copy(deep=True)
                offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0
        for event in evs:
            texts.append(event.text)
            if logprobs is not None and event.logprobs:
                part = self._logprobs(event.logprobs, offset)
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, key).extend(getattr(part, key))
                offset = part.text_offset[-1] + len(part.tokens[-1]) if part.tokens else offset
        return "".join(texts), logprobs

    def _stream(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                events: AsyncIterator[GenerationEvent], include_usage: bool, echo: tuple | None = None
                ) -> AsyncIterator[str]:
        start = 0  # text_offset of each choice's first generated token
        preamble = preamble_lp = None
        if echo is not None:  # the prompt first, in a chunk of its own
            preamble = {"text": echo[0]}
            if echo[1] is not None and gen.params.logprobs is not None:
                preamble_lp = echo[1].model_dump()
                start = echo[1].text_offset[-1] + len(echo[1].tokens[-1]) if echo[1].tokens else 0
        offsets = [start] * gen.n  # text_offset of each choice's next token, carried across chunks

        def logprobs(index: int, lps: list[TokenLogprob]) -> dict[str, Any]:
            part = self._logprobs(lps, offsets[index])
            offsets[index] = part.text_offset[-1] + len(part.tokens[-1]) if part.tokens else offsets[index]
            return part.model_dump()

        return self.stream_sse(gen, model, first, events, include_usage, obj="text_completion",
                               choice=lambda text, final: {"text": text}, logprobs=logprobs, preamble=preamble,
                               preamble_logprobs=preamble_lp)
