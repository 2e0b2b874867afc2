"""``POST /v1/completions``: one or several prompts (text or token ids), straight to the engine.

Several prompts (a list of strings or of token-id lists, up to ``--max-prompts``) give one choice
each, numbered by ``index`` in prompt order; they are submitted together, so they share the
engine's batches, and ``usage`` sums them. Streamed chunks carry their choice's ``index``.

``echo``: the prompt comes back before the completion, and with ``logprobs`` = k its tokens' log-
probabilities too (the first token's is null: nothing precedes it), each with its k most likely
alternatives; ``max_tokens: 0`` with ``echo`` scores the prompt and generates nothing (what
loglikelihood evaluation, e.g. lm-evaluation-harness's OpenAI completions model, sends, several
prompts per request when its batch size is above 1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.protocol import GenerationEvent, GenerationRequest, TokenLogprob, Usage

from . import structured_outputs
from .errors import APIError
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from .serving_engine import SSE_HEADERS, ChoiceStream, OpenAIServing, gather_choices, sum_usage


class OpenAIServingCompletion(OpenAIServing):
    request_prefix = "cmpl"

    async def create(self, req: CompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
        bank = self.resolve_bank(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        n, samples = self.num_choices(req.n, req.best_of, req.stream)
        prompts = self._prompt_list(req.prompt)
        structured, structured_param = structured_outputs.from_request(req)
        if structured is not None:
            await self.run_blocking(structured_outputs.check, structured, structured_param)
        prompt_ids = await self.run_blocking(lambda: [self._prompt_ids(p, i, len(prompts)) for i, p in enumerate(prompts)])
        score_only = req.echo and req.max_tokens == 0  # the engine makes one token, which is dropped
        request_id = self.new_id()
        gens = []
        for i, ids in enumerate(prompt_ids):
            params = self.sampling_params(req, len(ids), 1 if score_only else req.max_tokens, req.logprobs,
                                          "prompt")
            params.prompt_logprobs = req.echo and req.logprobs is not None
            params.structured = structured
            if samples > n and params.logprobs is None:
                params.logprobs = 0  # best_of ranks the samples by their tokens' log-probabilities
            rid = request_id if len(prompt_ids) == 1 else f"{request_id}-{i}"
            gens.append(GenerationRequest(rid, ids, params, bank=bank, n=samples))
        model = req.model or self.ctx.model_name
        started = await self.start_all(http, gens)  # prompt i's sample j at i * samples + j
        gen_of = [gen for gen in gens for _ in range(samples)]
        echoes: list[tuple | None] = [None] * len(started)
        if req.echo:
            for i, gen in enumerate(gens):
                first = started[i * samples][0]  # the prompt's log-probabilities come with its first choice
                text = prompts[i] if isinstance(prompts[i], str) else await self.run_blocking(
                    lambda ids: self.tokenizer.decode(ids), gen.prompt_token_ids)
                echo = (text, self._prompt_logprobs(gen.prompt_token_ids, first) if gen.params.prompt_logprobs
                        else None)
                echoes[i * samples:(i + 1) * samples] = [echo] * samples
        if score_only:
            started = [await self._drop_generated(gen, first, events) for gen, (first, events) in zip(gen_of, started)]
        if req.stream:  # samples == n here
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            choices = [self._choice_stream(k, gen, first, events, echoes[k], counts_prompt=k % n == 0)
                       for k, (gen, (first, events)) in enumerate(zip(gen_of, started))]
            return StreamingResponse(self.stream_sse(request_id, model, choices, include_usage, obj="text_completion"),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        async def collect() -> CompletionResponse:
            results = await gather_choices([self._full(k, gen, first, events, echoes[k])
                                            for k, (gen, (first, events)) in enumerate(zip(gen_of, started))])
            choices, usages = [], []
            for i in range(len(gens)):
                best = results[i * samples:(i + 1) * samples]
                if samples > n:  # vLLM's best_of: the n samples of highest cumulative log-probability, best first
                    best = sorted(best, key=lambda r: r[2], reverse=True)[:n]
                for j, (choice, usage, _) in enumerate(best):
                    choice.index = i * n + j
                    if req.logprobs is None:
                        choice.logprobs = None
                    if j > 0:  # the prompt, computed once, counts once
                        usage = UsageInfo(prompt_tokens=0, completion_tokens=usage.completion_tokens,
                                          total_tokens=usage.completion_tokens)
                    choices.append(choice)
                    usages.append(usage)
            return CompletionResponse(id=request_id, model=model, choices=choices, usage=sum_usage(usages))

        try:
            return await self.until_disconnect(http, [g.request_id for g in gens], collect())
        finally:
            await asyncio.gather(*(events.aclose() for _, events in started), return_exceptions=True)

    def _prompt_list(self, prompt: Any) -> list[str | list[int]]:
        """The request's prompts: one string, one token-id list, or a list of either."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = self.ctx.max_prompts
        if len(prompt) > limit:
            raise APIError(400, f"at most {limit} prompts per request, got {len(prompt)}", param="prompt")
        return list(prompt)

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
        """``echo`` with ``max_tokens: 0``: wait for the one token the engine made and answer without it."""
        event = first
        try:
            while not event.finished:
                event = await events.__anext__()
        finally:
            await events.aclose()
        done = GenerationEvent(request_id=gen.request_id, finished=True,
                               finish_reason="length" if event.finish_reason in ("length", "stop") else event.finish_reason,
                               error=event.error, usage=Usage(len(gen.prompt_token_ids), 0))

        async def nothing() -> AsyncIterator[GenerationEvent]:
            for _ in ():
                yield _

        return done, nothing()

    def _prompt_ids(self, prompt: str | list[int], index: int = 0, count: int = 1) -> list[int]:
        where = f"prompt[{index}]" if count > 1 else "the prompt"
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            self.check_token_ids(ids, "prompt")
        if not ids:
            raise APIError(400, f"{where} is empty", param="prompt")
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

    async def _full(self, index: int, gen: GenerationRequest, first: GenerationEvent,
                    events: AsyncIterator[GenerationEvent], echo: tuple | None = None):
        """One choice, collected: (its CompletionChoice, its usage, its tokens' cumulative log-probability
        (0 without logprobs))."""
        texts, n_tokens, event, cumulative = [], 0, first, 0.0
        logprobs = CompletionLogprobs() if gen.params.logprobs is not None else None
        offset = 0
        if echo is not None:
            texts.append(echo[0])
            if logprobs is not None and echo[1] is not None:
                logprobs = echo[1].model_copy(deep=True)
                offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0
        try:
            while True:
                texts.append(event.text)
                n_tokens += len(event.token_ids)
                cumulative += sum(lp.logprob for lp in event.logprobs or ())
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
        choice = CompletionChoice(index=index, text="".join(texts), logprobs=logprobs, finish_reason=event.finish_reason)
        return choice, self.usage(event, len(gen.prompt_token_ids), n_tokens), cumulative

    def _choice_stream(self, index: int, gen: GenerationRequest, first: GenerationEvent,
                       events: AsyncIterator[GenerationEvent], echo: tuple | None = None,
                       counts_prompt: bool = True) -> ChoiceStream:
        offset = 0  # text_offset of the choice's next token, carried across chunks
        preamble = preamble_lp = None
        if echo is not None:  # the prompt first, in a chunk of its own
            preamble = {"text": echo[0]}
            if echo[1] is not None and gen.params.logprobs is not None:
                preamble_lp = echo[1].model_dump()
                offset = echo[1].text_offset[-1] + len(echo[1].tokens[-1]) if echo[1].tokens else 0

        def logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
            nonlocal offset
            part = self._logprobs(lps, offset)
            offset = part.text_offset[-1] + len(part.tokens[-1]) if part.tokens else offset
            return part.model_dump()

        return ChoiceStream(index, gen, first, events, content=lambda text, final: {"text": text} if text or final else None,
                            logprobs=logprobs, empty={"text": ""}, preamble=preamble, preamble_logprobs=preamble_lp,
                            counts_prompt=counts_prompt)
