"""The engine as the HTTP layer sees it: ``submit`` returns an async stream of events.

The step loop runs in its own thread (the forward releases the GIL inside torch), so the event loop
stays responsive. Handoff is one way in each direction: the event loop appends commands (add,
abort) to a thread-safe inbox the step thread drains before each step; the step thread hands each
step's events back with one ``loop.call_soon_threadsafe`` into per-request asyncio queues.
Request validation, the overload check and bank lookup run in ``submit`` itself, so their errors
reach the caller at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import torch

from server.model import ModelConfig

from . import cpu_threads
from .config import EngineConfig
from .llm_engine import LLMEngine
from .protocol import (AdapterProvider, EngineOverloaded, EngineStopped, GenerationEvent, GenerationRequest,
                       InvalidRequest, StatsSink)

log = logging.getLogger(__name__)


def merge_into(event: GenerationEvent, later: GenerationEvent) -> None:
    """Append ``later`` (the same choice's next event) to ``event``, as if one step had made both."""
    event.text += later.text
    event.token_ids = event.token_ids + later.token_ids
    if later.logprobs is not None:
        event.logprobs = (event.logprobs or []) + later.logprobs
    event.finished, event.finish_reason = later.finished, later.finish_reason
    event.error, event.usage = later.error, later.usage


class RequestStream:
    """Async iterator over one request's events; ends after the event with ``finished`` set (of each
    of its ``n`` choices, whose events interleave).

    Events a reader has not taken yet are merged per choice (vLLM's output collector): a reader that
    falls behind the engine (a busy event loop, a slow client) gets one event with every token since
    its last read instead of a queue of them, so the work per step on the event loop does not grow
    with its backlog."""

    def __init__(self, request_id: str, engine: "AsyncEngine", n: int = 1):
        self.request_id = request_id
        self._engine = engine
        self._pending: dict[int, GenerationEvent] = {}  # choice index -> its unread (merged) event, oldest first
        self._ready: asyncio.Future | None = None
        self.n = n
        self.finished = False
        self.unfinished_choices = n  # finished events not yet read
        self.delivered_finals: set[int] = set()  # choices whose finished event was delivered

    def _put(self, event: GenerationEvent) -> None:
        unread = self._pending.get(event.index)
        if unread is not None:
            merge_into(unread, event)
        else:
            self._pending[event.index] = event
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.finished:
            raise StopAsyncIteration
        while not self._pending:
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready
        event = self._pending.pop(next(iter(self._pending)))
        if event.finished:
            self.unfinished_choices -= 1
            self.finished = self.unfinished_choices <= 0
        return event

    async def aclose(self) -> None:
        """Stop listening; aborts the request if it has not finished (e.g. the client went away)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, engine: LLMEngine | None = None, own_cpu_threads: bool = False):
        """``own_cpu_threads``: the step thread gets the torch threads the caller of ``start`` has, and
        every other thread runs torch on one (``cpu_threads``: one OpenMP team in the process); a server
        process sets it, tests that share their process leave it off."""
        self.config = config
        self.engine = engine
        self.own_cpu_threads = own_cpu_threads
        self._restore_threads: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stop_thread = False
        self._accepting = False
        self._streams: dict[str, RequestStream] = {}
        self.num_steps_failed = 0

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (in a worker thread) unless an engine was given, then start the step loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            self.engine = await asyncio.to_thread(self._build_engine)
        self._stop_thread = False
        threads = torch.get_num_threads() if self.own_cpu_threads else None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(threads, ready), name="moleserve-engine", daemon=True)
        self._thread.start()
        if threads is not None:
            ready.wait()
            cpu_threads.single_threaded_elsewhere()
            self._restore_threads = threads
        self._accepting = True

    def _build_engine(self) -> LLMEngine:
        engine = LLMEngine(self.config)
        if self.own_cpu_threads:
            cpu_threads.release_thread_pool()  # this worker thread's OpenMP pool: the step thread gets its own
        return engine

    async def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to ``grace_s`` seconds, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stop_thread = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None
        for stream in list(self._streams.values()):  # anything the loop did not get to
            for index in set(range(stream.n)) - stream.delivered_finals:
                stream._put(GenerationEvent(request_id=stream.request_id, index=index, finished=True,
                                            finish_reason="abort"))
        self._streams.clear()

    shutdown = stop

    @property
    def is_running(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    # --- what the server reads ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._need_engine().tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self._need_engine().model_config

    @property
    def max_model_len(self) -> int:
        return self._need_engine().max_model_len

    @property
    def multimodal_spec(self):
        """``server.multimodal.MultiModalSpec`` of the served model, None for a text-only model."""
        return self._need_engine().multimodal_spec

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted (including those submitted since the last step)."""
        adds = sum(1 for kind, _ in list(self._inbox) if kind == "add")
        return (self.engine.num_waiting if self.engine else 0) + adds

    @property
    def num_running(self) -> int:
        return self.engine.num_running if self.engine else 0

    @property
    def kv_blocks_free(self) -> int:
        return self.engine.block_manager.num_free_blocks if self.engine else 0

    @property
    def kv_blocks_total(self) -> int:
        return self.engine.block_manager.num_blocks if self.engine else 0

    def bank_activity(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Banks of the running and of the waiting requests now (also those submitted since the
        last step), as the step's stats report them; read at scrape time, since an idle engine
        reports no steps."""
        if self.engine is None:
            return (), ()
        sched = self.engine.scheduler
        running = {s.bank for s in list(sched.running) if s.bank is not None}
        waiting = {s.bank for s in list(sched.waiting) if s.bank is not None}
        waiting |= {arg[0].bank for kind, arg in list(self._inbox) if kind == "add" and arg[0].bank is not None}
        return tuple(sorted(running)), tuple(sorted(waiting))

    @property
    def kv_block_size(self) -> int:
        return self.engine.block_manager.block_size if self.engine else self.config.block_size

    @property
    def kv_cache_dtype(self) -> str:
        return str(self.engine.cache.k.dtype).removeprefix("torch.") if self.engine else "auto"

    @property
    def max_banks(self) -> int:
        """Banks that can be resident at once (vLLM's ``max_loras``, shown as ``max_lora``): the
        adapter provider's answer for a step of ``max_num_seqs`` sequences; 0 without banks."""
        provider = self.engine.adapter_provider if self.engine else None
        resident = getattr(provider, "max_resident", None)
        return resident(self.config.max_num_seqs) if resident is not None else 0

    def set_stats_sink(self, sink: StatsSink | None) -> None:
        self._need_engine().set_stats_sink(sink)

    def set_adapter_provider(self, provider: AdapterProvider | None) -> None:
        self._need_engine().set_adapter_provider(provider)

    def _need_engine(self) -> LLMEngine:
        if self.engine is None:
            raise EngineStopped("the engine has not started")
        return self.engine

    # --- requests ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; raises InvalidRequest, EngineOverloaded, UnknownBank or EngineStopped now."""
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        engine = self.engine
        engine.validate(request)
        if request.request_id in self._streams:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        if self.num_waiting >= self.config.max_waiting:
            raise EngineOverloaded(f"{self.config.max_waiting} requests are already waiting; retry later")
        handle = engine.acquire_bank(request.bank)
        try:
            engine.check_images(request, handle)  # a tower-only base needs a parrot bank: 400 now
        except Exception:
            engine.release_bank(handle)
            raise
        stream = RequestStream(request.request_id, self, request.n)
        self._streams[request.request_id] = stream
        self._inbox.append(("add", (request, handle)))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its blocks are freed before the next step."""
        self._inbox.append(("abort", request_id))
        self._wake.set()

    # --- the step thread ---------------------------------------------------------------------------
    def _drain_inbox(self) -> list[GenerationEvent]:
        events = []
        while self._inbox:
            kind, arg = self._inbox.popleft()
            if kind == "add":
                request, handle = arg
                try:
                    self.engine.add_request(request, adapter_handle=handle, acquired=True)
                except Exception as exc:  # noqa: BLE001 - e.g. a duplicate id raced in: fail that request
                    self.engine.release_bank(handle)
                    events += [GenerationEvent(request_id=request.request_id, index=j, finished=True,
                                               finish_reason="error", error=str(exc)) for j in range(request.n)]
            else:
                events += self.engine.abort(arg)
        return events

    def _run(self, threads: int | None = None, ready: threading.Event | None = None) -> None:
        try:
            if threads is not None:
                cpu_threads.own_thread_count(threads)
        finally:
            if ready is not None:
                ready.set()
        engine = self.engine
        while not self._stop_thread:
            try:
                events = self._drain_inbox()
                if engine.has_unfinished():
                    events += engine.step()
                if events:
                    self._loop.call_soon_threadsafe(self._deliver, events)
                elif not engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            except Exception as exc:  # noqa: BLE001 - the loop must survive; its requests fail with a message
                log.exception("engine loop error")
                self.num_steps_failed += 1
                try:
                    events = engine.fail_all(f"internal engine error: {type(exc).__name__}: {exc}")
                    self._loop.call_soon_threadsafe(self._deliver, events)
                except Exception:  # noqa: BLE001
                    log.exception("engine loop: could not fail the requests")
                    time.sleep(0.1)
        # Stopping: apply the last commands, then abort whatever is left so every block is returned.
        events = self._drain_inbox()
        events += [e for rid in list(engine.sequences) for e in engine.abort(rid)]
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[GenerationEvent]) -> None:
        """On the event loop: route each event to its request's stream."""
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            stream._put(event)
            if event.finished:
                stream.delivered_finals.add(event.index)
                if len(stream.delivered_finals) >= stream.n:
                    del self._streams[event.request_id]
