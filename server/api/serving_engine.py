"""What chat and completions share: resolving ``model`` to a bank, building and checking
``SamplingParams``, submitting to the engine, aborting on client disconnect, logprob rendering and
server-sent events.

A request with ``n`` > 1 is one engine request whose choices (computed from one prompt pass)
arrive as interleaved events tagged with their ``index``; responses list one choice per index,
streams tag each chunk's choice with it, and usage counts the prompt once and every choice's tokens."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from fastapi import Request

from server.engine.protocol import MAX_LOGPROBS, EngineError, GenerationEvent, GenerationRequest, SamplingParams, Usage

from .banks import bank_infos
from .errors import APIError, error_body, from_exception
from .lifecycle import Admission
from .protocol import UsageInfo, _Sampling
from .tokenizer_pool import TokenizerPool

T = TypeVar("T")


@dataclass
class ServingContext:
    """Everything a serving object needs, built once by the app factory."""

    engine: Any  # AsyncEngine (server/engine/async_engine.py) or a test double with its surface
    model_name: str
    max_model_len: int
    admission: Admission
    metrics: Any  # server.metrics.ServerMetrics
    banks: Any = None  # server.api.banks.BankAdmin or None
    retry_after: int = 1
    media: Any = None  # server.multimodal.media.MediaPolicy: where chat images may come from, how large
    tokenizers: TokenizerPool | None = None  # None: one worker on the engine's tokenizer
    max_tokens_default: int | None = None  # max_tokens of a request without one (None: the rest of the context)
    max_tokens_limit: int | None = None  # largest max_tokens accepted (None: the context window)
    max_messages: int | None = None  # most messages in one chat request


class OpenAIServing:
    request_prefix = "req"

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        if ctx.tokenizers is None:
            ctx.tokenizers = TokenizerPool(ctx.engine.tokenizer, workers=1)
        self._decode_one = lru_cache(maxsize=65536)(lambda tid: self.tokenizer.decode([tid]))

    @property
    def tokenizer(self) -> Any:
        """This thread's tokenizer: a tokenizer worker's own copy inside ``run_blocking``, else the
        original (the event loop's)."""
        return self.ctx.tokenizers.current()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a tokenizer worker (``self.tokenizer`` there is that worker's copy)."""
        return await self.ctx.tokenizers.run(fn, *args)

    def new_id(self) -> str:
        return f"{self.request_prefix}-{uuid.uuid4().hex}"

    # -- request -> GenerationRequest ------------------------------------------------------------

    def resolve_bank(self, model: str | None) -> str | None:
        if model is None or model == self.ctx.model_name:
            return None
        names = {b.name for b in bank_infos(self.ctx.banks)}
        if model in names:
            return model
        # "factorbank+bank": both must be loaded; whether they combine is the registry's call (400)
        if "+" in model and all(part in names for part in model.split("+")):
            return model
        raise APIError(404, f"the model {model!r} does not exist (the base model is {self.ctx.model_name!r}; "
                            "GET /v1/models lists the banks)", param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range [0, {vocab})", param=param)

    def sampling_params(self, req: _Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                        prompt_param: str) -> SamplingParams:
        if req.n is not None and req.n < 1:
            raise APIError(400, f"n must be at least 1, got {req.n}", param="n")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        limit = self.ctx.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{prompt_len} tokens", param=prompt_param, code="context_length_exceeded")
        cap = self.ctx.max_tokens_limit
        if max_tokens is not None and cap is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens ({max_tokens}) is more than this server's limit of {cap} "
                                "(--max-tokens-limit)", param="max_tokens")
        if max_tokens is None:
            max_tokens = limit - prompt_len
            for bound in (self.ctx.max_tokens_default, cap):
                max_tokens = min(max_tokens, bound or max_tokens)
        elif prompt_len + max_tokens > limit:
            raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt's {prompt_len} tokens exceed this model's "
                                f"maximum context length of {limit} tokens", param="max_tokens",
                           code="context_length_exceeded")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop_ids = list(req.stop_token_ids or [])
        self.check_token_ids(stop_ids, "stop_token_ids")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=[s for s in stop if s],
            stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
        params.validate()  # InvalidRequest -> 400
        return params

    # -- running it --------------------------------------------------------------------------------

    async def start(self, http: Request, gen: GenerationRequest) -> tuple[GenerationEvent, AsyncIterator[GenerationEvent]]:
        """Submit and wait for the first event, aborting if the client goes away meanwhile. Errors
        the engine raises at admission (400, 404, 429, 503) come out as ``APIError``."""
        events = self._events(gen)
        first = await self.until_disconnect(http, gen.request_id, events.__anext__())
        return first, events

    async def _events(self, gen: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        admission, engine = self.ctx.admission, self.ctx.engine
        admission.enter()
        finished = False
        iterator = None
        try:
            try:
                iterator = engine.submit(gen)
                if inspect.isawaitable(iterator):
                    iterator = await iterator
            except EngineError as exc:
                if exc.status == 429:
                    self.ctx.metrics.on_rejected("overloaded")
                raise from_exception(exc, self.ctx.retry_after) from None
            try:
                unfinished = gen.n
                async for event in iterator:
                    unfinished -= event.finished
                    finished = unfinished <= 0
                    yield event
                    if finished:
                        return
            except EngineError as exc:
                finished = True  # the engine ended it
                raise from_exception(exc, self.ctx.retry_after) from None
            raise APIError(500, "the engine ended the request without a final event")
        finally:
            if not finished:
                await self.abort(gen.request_id)
            if iterator is not None and hasattr(iterator, "aclose"):
                try:
                    await iterator.aclose()
                except Exception:  # noqa: BLE001 - closing a finished iterator must not mask the real error
                    pass
            admission.leave()

    async def abort(self, request_id: str) -> None:
        result = self.ctx.engine.abort(request_id)
        if inspect.isawaitable(result):
            await result

    async def until_disconnect(self, http: Request, request_id: str, work: Awaitable[T]) -> T:
        """Run ``work``; if the client disconnects first, abort the request at once and stop."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(http))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            await self.abort(request_id)
            task.cancel()
            raise APIError(499, "client disconnected", type="client_closed_request")
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    # -- output --------------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self._decode_one(token_id)

    @staticmethod
    async def collect(gen: GenerationRequest, first: GenerationEvent, events: AsyncIterator[GenerationEvent]
                      ) -> list[list[GenerationEvent]]:
        """Every event of each of the request's choices, by choice index, until all have finished;
        raises the first choice error as a 500."""
        by_index: list[list[GenerationEvent]] = [[] for _ in range(gen.n)]
        unfinished, event = gen.n, first
        try:
            while True:
                by_index[event.index].append(event)
                unfinished -= event.finished
                if unfinished <= 0:
                    break
                event = await events.__anext__()
        finally:
            await events.aclose()
        for evs in by_index:
            OpenAIServing.check_final(evs[-1])
        return by_index

    async def stream_sse(self, gen: GenerationRequest, model: str, first: GenerationEvent,
                         events: AsyncIterator[GenerationEvent], include_usage: bool, *, obj: str,
                         choice: Callable[[str, bool], dict[str, Any]],
                         logprobs: Callable[[list[Any]], Any], preamble: dict[str, Any] | None = None,
                         preamble_logprobs: Any = None) -> AsyncIterator[str]:
        """Server-sent events of one request, ending with ``data: [DONE]`` (chat and completions).

        ``choice(text, final)`` gives the endpoint's content fields of a chunk's choice (chat: a
        ``delta``, completions: ``text``); ``logprobs(index, token_logprobs)`` its logprobs object;
        ``preamble`` the fields of each choice's first chunk before the generated ones (chat's
        assistant role, completions' echoed prompt), with ``preamble_logprobs`` as its logprobs.
        Each chunk carries one choice, tagged with its index (n > 1: the choices interleave).
        """
        created = int(time.time())
        want_logprobs = gen.params.logprobs is not None

        def chunk(index: int, fields: dict[str, Any], finish_reason: str | None = None, lp: Any = None) -> str:
            body: dict[str, Any] = {
                "id": gen.request_id, "object": obj, "created": created, "model": model,
                "choices": [{"index": index, **fields, "logprobs": lp, "finish_reason": finish_reason}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        n_tokens, unfinished, event = 0, gen.n, first
        finals: list[GenerationEvent] = []
        try:
            if preamble is not None:
                for index in range(gen.n):
                    yield chunk(index, preamble, lp=preamble_logprobs)
            while True:
                n_tokens += len(event.token_ids)
                lp = logprobs(event.index, event.logprobs) if want_logprobs and event.logprobs else None
                if event.finished:
                    if event.finish_reason == "error":
                        self.check_final(event)
                    yield chunk(event.index, choice(event.text, True), event.finish_reason, lp)
                    finals.append(event)
                    unfinished -= 1
                    if unfinished <= 0:
                        break
                elif event.text or lp:
                    yield chunk(event.index, choice(event.text, False), None, lp)
                event = await events.__anext__()
            if include_usage:
                usage = self.usage(finals, len(gen.prompt_token_ids), n_tokens)
                yield sse({"id": gen.request_id, "object": obj, "created": created, "model": model,
                           "choices": [], "usage": usage.model_dump()})
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes into the stream
            yield sse_error(exc)
        finally:
            await events.aclose()
        yield sse("[DONE]")

    @staticmethod
    def usage(finals: list[GenerationEvent], prompt_len: int, completion_tokens: int) -> UsageInfo:
        """The request's usage from its choices' final events: the prompt once, every choice's tokens."""
        used = [e.usage or Usage(prompt_len, 0) for e in finals]
        prompt = used[0].prompt_tokens if used else prompt_len
        completion = sum(u.completion_tokens for u in used) if all(e.usage for e in finals) else completion_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @staticmethod
    def check_final(event: GenerationEvent) -> None:
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error or 'engine error'}")


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(exc: BaseException) -> str:
    e = from_exception(exc)
    return sse(error_body(e.status, e.message, e.type, e.param, e.code))


async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
