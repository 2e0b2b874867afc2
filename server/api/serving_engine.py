"""What chat and completions share: resolving ``model`` to a bank, building and checking
``SamplingParams``, submitting to the engine, aborting on client disconnect, logprob rendering and
server-sent events."""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, TypeVar

from fastapi import Request

from server.engine.protocol import (MAX_LOGPROBS, EngineError, GenerationEvent, GenerationRequest, SamplingParams,
                                   UnknownBank, Usage)

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
    max_prompts: int = 128  # prompts in one /v1/completions request (settings.max_prompts)
    max_n: int = 16  # largest n / best_of (settings.max_n, at most settings.max_num_seqs)
    tool_call_parser: str = "hermes"  # settings.tool_call_parser
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
        may_load = getattr(self.ctx.banks, "may_load", None)
        if may_load is not None and may_load(model):  # loaded on demand before submit (``ensure_banks``)
            return model
        raise APIError(404, f"the model {model!r} does not exist (the base model is {self.ctx.model_name!r}; "
                            "GET /v1/models lists the banks)", param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range [0, {vocab})", param=param)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's ``logit_bias`` ({"token id": value}) as the engine's {token id: value}: keys must be
        integers naming tokens of the vocabulary (400 otherwise), values are clamped to [-100, 100] as
        vLLM does (-100 in effect bans a token, 100 all but forces it)."""
        if not bias:
            return None
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids (integers), got {key!r}",
                               param="logit_bias") from None
            out[token] = min(100.0, max(-100.0, float(value)))
        self.check_token_ids(list(out), "logit_bias")
        return out

    def num_choices(self, n: int | None, best_of: int | None = None, stream: bool = False) -> tuple[int, int]:
        """(n, samples): the choices returned per prompt and the samples drawn per prompt (``best_of``:
        the ``n`` of them with the highest cumulative log-probability are returned; vLLM's semantics).
        Both are at most ``--max-n``; ``best_of`` >= ``n``; ``best_of`` > ``n`` cannot stream."""
        n = 1 if n is None else n
        most = self.ctx.max_n
        if not 1 <= n <= most:
            raise APIError(400, f"n must be in [1, {most}] (--max-n, --max-num-seqs), got {n}", param="n")
        if best_of is None:
            return n, n
        if not 1 <= best_of <= most:
            raise APIError(400, f"best_of must be in [1, {most}] (--max-n, --max-num-seqs), got {best_of}", param="best_of")
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
        if stream and best_of > n:
            raise APIError(400, "best_of > n cannot be streamed (the best choices are known only at the end)",
                           param="best_of")
        return n, best_of

    def sampling_params(self, req: _Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                        prompt_param: str) -> SamplingParams:
        logit_bias = self.logit_bias(req.logit_bias)
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
            logit_bias=logit_bias,
        )
        params.validate()  # InvalidRequest -> 400
        return params

    # -- running it --------------------------------------------------------------------------------

    async def start_all(self, http: Request, gens: list[GenerationRequest]
                        ) -> list[tuple[GenerationEvent, AsyncIterator[GenerationEvent]]]:
        """Submit the engine requests of one HTTP request (one per prompt) at once, so they share
        the engine's batches, and wait for each choice's first event, aborting if the client goes
        away meanwhile: the first event and the rest of each choice, in order (request i's ``n``
        choices, then request i + 1's). If one is refused (the engine's 400, 404, 429, 503 at
        admission come out as ``APIError``), the others are aborted and its error is raised."""
        streams: list[Any] = []
        for gen in gens:
            events = self._events(gen)
            streams += [events] if gen.n == 1 else ChoiceFanOut(events, gen.n, partial(self.abort, gen.request_id)).choices

        async def firsts():
            return await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)

        try:
            results = await self.until_disconnect(http, [g.request_id for g in gens], firsts())
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise failed
        return list(zip(results, streams))

    async def _events(self, gen: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        admission = self.ctx.admission
        admission.enter()
        finished = False
        iterator = None
        unfinished = gen.n  # choices whose final event is still to come
        try:
            try:
                iterator = await self._submit(gen)
            except EngineError as exc:
                if exc.status == 429:
                    self.ctx.metrics.on_rejected("overloaded")
                raise from_exception(exc, self.ctx.retry_after) from None
            try:
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

    async def _submit(self, gen: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Submit ``gen`` once its bank is loaded (``ensure_banks``). A bank evicted between its
        load and the submit (other loads needed the room) is loaded again, four times at most."""
        for attempt in range(5):
            await self.ensure_banks(gen.bank)
            try:
                iterator = self.ctx.engine.submit(gen)
                return await iterator if inspect.isawaitable(iterator) else iterator
            except UnknownBank as exc:
                if type(exc) is not UnknownBank or attempt == 4 or getattr(self.ctx.banks, "ensure", None) is None:
                    raise
        raise AssertionError("unreachable")

    async def ensure_banks(self, bank: str | None) -> None:
        """Load the banks ``bank`` names on demand (the registry's ``ensure``; errors are 4xx/5xx
        bank errors naming the bank, its file and the reason)."""
        ensure = getattr(self.ctx.banks, "ensure", None)
        if bank is None or ensure is None:
            return
        try:
            await ensure(bank)
        except Exception as exc:  # noqa: BLE001 - bank errors carry their status; others are 500s
            raise from_exception(exc, self.ctx.retry_after) from None

    async def abort(self, request_id: str) -> None:
        result = self.ctx.engine.abort(request_id)
        if inspect.isawaitable(result):
            await result

    async def until_disconnect(self, http: Request, request_id: str | list[str], work: Awaitable[T]) -> T:
        """Run ``work``; if the client disconnects first, abort the request(s) at once and stop."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(http))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            for rid in [request_id] if isinstance(request_id, str) else request_id:
                await self.abort(rid)
            task.cancel()
            raise APIError(499, "client disconnected", type="client_closed_request")
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    # -- output --------------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self._decode_one(token_id)

    async def stream_sse(self, request_id: str, model: str, choices: list[ChoiceStream], include_usage: bool, *,
                         obj: str) -> AsyncIterator[str]:
        """Server-sent events of the choices of one response, ending with ``data: [DONE]`` (chat and
        completions). Each chunk carries one choice, tagged by its ``index``; the choices' chunks
        interleave as their tokens arrive. With ``include_usage`` a last chunk has the usage summed
        over the choices. An error in one choice ends the stream with an error event (the other
        choices are aborted)."""
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        usages: list[UsageInfo] = []
        _DONE = object()

        def chunk(c: ChoiceStream, fields: dict[str, Any], finish_reason: str | None = None, lp: Any = None) -> str:
            body: dict[str, Any] = {
                "id": request_id, "object": obj, "created": created, "model": model,
                "choices": [{"index": c.index, **fields, "logprobs": lp, "finish_reason": finish_reason}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        async def pump(c: ChoiceStream) -> None:
            want_logprobs = c.gen.params.logprobs is not None
            n_tokens, event = 0, c.first
            try:
                if c.preamble is not None:
                    await queue.put(chunk(c, c.preamble, lp=c.preamble_logprobs))
                while True:
                    n_tokens += len(event.token_ids)
                    lp = c.logprobs(event.logprobs) if want_logprobs and event.logprobs else None
                    if event.finished:
                        if event.finish_reason == "error":
                            self.check_final(event)
                        fields = c.content(event.text, True)
                        await queue.put(chunk(c, fields, c.finish_reason(event.finish_reason), lp))
                        break
                    fields = c.content(event.text, False)
                    if fields is not None or lp:
                        await queue.put(chunk(c, c.empty if fields is None else fields, None, lp))
                    event = await c.events.__anext__()
                usages.append(self.usage(event, len(c.gen.prompt_token_ids), n_tokens, c.counts_prompt))
            except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes into the stream
                await queue.put(exc)
            finally:
                await queue.put(_DONE)

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            open_choices = len(tasks)
            while open_choices:
                item = await queue.get()
                if item is _DONE:
                    open_choices -= 1
                elif isinstance(item, BaseException):
                    yield sse_error(item)
                    break
                else:
                    yield item
            else:
                if include_usage:
                    yield sse({"id": request_id, "object": obj, "created": created, "model": model,
                               "choices": [], "usage": sum_usage(usages).model_dump()})
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(c.events.aclose() for c in choices), return_exceptions=True)
        yield sse("[DONE]")

    @staticmethod
    def usage(event: GenerationEvent, prompt_len: int, completion_tokens: int, count_prompt: bool = True) -> UsageInfo:
        """One choice's usage; ``count_prompt`` False for a prompt's choices after its first (the
        prompt, computed once, counts once)."""
        u = event.usage or Usage(prompt_len, completion_tokens)
        p = u.prompt_tokens if count_prompt else 0
        return UsageInfo(prompt_tokens=p, completion_tokens=u.completion_tokens, total_tokens=p + u.completion_tokens)

    @staticmethod
    def check_final(event: GenerationEvent) -> None:
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error or 'engine error'}")


@dataclass
class ChoiceStream:
    """One choice of a streamed response: its engine request, first event and the rest, and how the
    endpoint renders it. ``content(text, final)`` gives a chunk's content fields (chat: a ``delta``,
    completions: ``text``), or None when a non-final chunk has nothing to send; ``logprobs`` its
    logprobs object; ``preamble`` the fields of a chunk before the generated ones (chat's assistant
    role, completions' echoed prompt); ``finish_reason`` may rename the engine's (chat: tool_calls)."""

    index: int
    gen: GenerationRequest
    first: GenerationEvent
    events: AsyncIterator[GenerationEvent]
    content: Callable[[str, bool], dict[str, Any] | None]
    logprobs: Callable[[list[Any]], Any]
    empty: dict[str, Any] = field(default_factory=dict)  # the content fields of a chunk that only has logprobs
    preamble: dict[str, Any] | None = None
    preamble_logprobs: Any = None
    finish_reason: Callable[[str | None], str | None] = lambda reason: reason
    counts_prompt: bool = True  # False for a prompt's choices after its first: usage counts the prompt once


class ChoiceFanOut:
    """The ``n`` choices of one engine request as one event iterator each (``choices[j]``).

    The engine streams the choices' events interleaved (``GenerationEvent.index``); whichever
    choice's reader needs an event pulls the next one from the request's stream and files it under
    its choice. An error of the stream reaches every choice. Closing a choice that has not finished
    closes the stream (the engine aborts every choice of the request; ``abort`` does it while another
    choice is reading the stream); so does closing the last."""

    def __init__(self, events: AsyncIterator[GenerationEvent], n: int, abort: Callable[[], Awaitable[None]]):
        self._events, self._abort = events, abort
        self._queues: list[collections.deque[GenerationEvent]] = [collections.deque() for _ in range(n)]
        self._finished = [False] * n
        self._closed = [False] * n
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None
        self.choices = [_Choice(self, j) for j in range(n)]

    async def next(self, j: int) -> GenerationEvent:
        queue = self._queues[j]
        while not queue:
            if self._error is not None:
                raise self._error
            if self._finished[j]:
                raise StopAsyncIteration
            async with self._lock:
                if queue or self._error is not None:
                    continue
                try:
                    event = await self._events.__anext__()
                except StopAsyncIteration:
                    self._error = APIError(500, "the engine ended the request without a final event")
                    continue
                except Exception as exc:
                    self._error = exc
                    raise
                self._queues[event.index].append(event)
        event = queue.popleft()
        self._finished[j] = self._finished[j] or event.finished
        return event

    async def close(self, j: int) -> None:
        if self._closed[j]:
            return
        self._closed[j] = True
        if not self._finished[j] or all(self._closed):
            try:
                await self._events.aclose()
            except RuntimeError:  # another choice is reading it now: abort the request instead
                await self._abort()


class _Choice:
    """One choice of a ``ChoiceFanOut``: an async iterator of its events with ``aclose``."""

    def __init__(self, fan: ChoiceFanOut, index: int):
        self._fan, self._index = fan, index

    def __aiter__(self) -> "_Choice":
        return self

    async def __anext__(self) -> GenerationEvent:
        return await self._fan.next(self._index)

    async def aclose(self) -> None:
        await self._fan.close(self._index)


async def gather_choices(coros: list[Any]) -> list[Any]:
    """Run one coroutine per choice of a non-streamed response and return their results in order;
    the first failure ends the response: the other choices are cancelled (their engine requests
    aborted) and the error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sum_usage(usages: list[UsageInfo]) -> UsageInfo:
    """The usage of a response with several choices: every prompt's tokens (once per prompt: its
    later choices' usages count none) and every completion's."""
    p, c = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


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
