"""A small stand-in with the ``AsyncEngine`` surface, so the HTTP layer is tested without a model.

It "generates" a fixed script of tokens, one per step for every running request, keeps a bounded
waiting queue, counts KV blocks per request, reports ``StepStats`` / ``RequestStats`` (and routing
counts for requests with a bank) to the stats sink, and records aborts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

from server.engine.protocol import (EngineOverloaded, EngineStopped, GenerationEvent, GenerationRequest, InvalidRequest,
                                    RequestStats, StepStats, TokenLogprob, UnknownBank, Usage)
from server.engine.routing_stats import BankRoutingStats, RoutingStats

SCRIPT = "Hello from the fake engine. It writes the same words again and again. "


@dataclass
class _Seq:
    req: GenerationRequest
    queue: asyncio.Queue
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)


class FakeEngine:
    def __init__(self, tokenizer, *, name: str = "fake-model", max_model_len: int = 512, max_running: int = 4,
                 max_waiting: int = 8, step_s: float = 0.002, block_size: int = 16, kv_blocks_total: int = 256,
                 banks=None):
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(name=name, max_position_embeddings=max_model_len)
        self.max_running, self.max_waiting, self.step_s = max_running, max_waiting, step_s
        self.block_size, self.kv_blocks_total = block_size, kv_blocks_total
        self.banks = banks  # something with .list() of objects with .name, or None
        self.script = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
        self.is_running = False
        self.sink = None
        self.waiting: deque[_Seq] = deque()
        self.running: dict[str, _Seq] = {}
        self.aborted: list[str] = []
        self.submitted: list[GenerationRequest] = []
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # -- the AsyncEngine surface ---------------------------------------------------------------------

    def set_stats_sink(self, sink) -> None:
        self.sink = sink

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())
        self.is_running = True

    async def stop(self, *_, **__) -> None:
        self.is_running = False
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for seq in [*self.waiting, *self.running.values()]:
            self._finish(seq, "abort")
        self.waiting.clear()
        self.running.clear()

    def submit(self, req: GenerationRequest):
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        limit = self.model_config.max_position_embeddings
        if len(req.prompt_token_ids) + req.params.max_tokens > limit:
            raise InvalidRequest(f"prompt ({len(req.prompt_token_ids)}) + max_tokens ({req.params.max_tokens}) > {limit}")
        if req.bank is not None and (self.banks is None or req.bank not in {b.name for b in self.banks.list()}):
            raise UnknownBank(f"no bank named {req.bank!r}")
        if req.n != 1:
            raise InvalidRequest(f"the fake engine samples one choice per request, got n={req.n}", param="n")
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting")
        seq = _Seq(req, asyncio.Queue())
        self.submitted.append(req)
        self.waiting.append(seq)
        self._wake.set()
        return self._events(seq)

    def abort(self, request_id: str) -> None:
        for seq in list(self.waiting):
            if seq.req.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, "abort")
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self._finish(seq, "abort")

    # -- for tests ---------------------------------------------------------------------------------------

    @property
    def kv_blocks_used(self) -> int:
        return sum(self._blocks(s) for s in self.running.values())

    # -- internals -----------------------------------------------------------------------------------------

    async def _events(self, seq: _Seq):
        while True:
            event = await seq.queue.get()
            yield event
            if event.finished:
                return

    def _blocks(self, seq: _Seq) -> int:
        return math.ceil((len(seq.req.prompt_token_ids) + len(seq.out_ids)) / self.block_size)

    def _finish(self, seq: _Seq, reason: str, text: str = "", ids: list[int] | None = None, logprobs=None) -> None:
        if reason == "abort":
            self.aborted.append(seq.req.request_id)
        usage = Usage(len(seq.req.prompt_token_ids), len(seq.out_ids))
        seq.queue.put_nowait(GenerationEvent(seq.req.request_id, text=text, token_ids=ids or [], logprobs=logprobs,
                                             finished=True, finish_reason=reason, usage=usage))
        if self.sink is not None:
            now = time.monotonic()
            t = seq.token_times
            self.sink.on_request_finished(RequestStats(
                request_id=seq.req.request_id, bank=seq.req.bank, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, finish_reason=reason,
                queue_time_s=(seq.first_scheduled or now) - seq.req.arrival_time,
                ttft_s=t[0] - seq.req.arrival_time if t else None, e2e_s=now - seq.req.arrival_time,
                inter_token_s=[b - a for a, b in zip(t, t[1:])]))

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._report(0)
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.step_s)
            while self.waiting and len(self.running) < self.max_running:
                seq = self.waiting.popleft()
                seq.first_scheduled = time.monotonic()
                self.running[seq.req.request_id] = seq
            routing = RoutingStats(pool_slots_used=len({s.req.bank for s in self.running.values() if s.req.bank}),
                                   pool_slots_total=8)
            for seq in list(self.running.values()):
                self._advance(seq, routing)
            self._report(len(self.running), routing)

    def _advance(self, seq: _Seq, routing: RoutingStats) -> None:
        p = seq.req.params
        tid = self.script[len(seq.out_ids) % len(self.script)]
        seq.out_ids.append(tid)
        seq.token_times.append(time.monotonic())
        if seq.req.bank:
            b = routing.banks.setdefault(seq.req.bank, BankRoutingStats())
            b.tokens += 1
            b.decisions += 2
            b.broadcast += 1
            for layer in range(2):
                counts = b.selections.setdefault((layer, "q"), [0, 0, 0, 0])
                counts[len(seq.out_ids) % 4] += 1
            b.experts_per_decision = [0, 1, 1]
            b.entropy_counts = [0] * 5 + [2] + [0] * 7
            b.entropy_sum += 0.9
        full = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
        new_text = full[len(seq.text):]
        seq.text = full
        logprobs = None
        if p.logprobs is not None:
            logprobs = [TokenLogprob(tid, -0.5, [(self.script[(len(seq.out_ids) + j) % len(self.script)], -1.0 - j)
                                                 for j in range(p.logprobs)])]
        for stop in p.stop:
            at = full.find(stop)
            if at >= 0:
                del self.running[seq.req.request_id]
                keep = full[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                self._finish(seq, "stop", keep[len(full) - len(new_text):], [tid], logprobs)
                return
        if len(seq.out_ids) >= p.max_tokens:
            del self.running[seq.req.request_id]
            self._finish(seq, "length", new_text, [tid], logprobs)
            return
        seq.queue.put_nowait(GenerationEvent(seq.req.request_id, text=new_text, token_ids=[tid], logprobs=logprobs))

    def _report(self, num_running: int, routing: RoutingStats | None = None) -> None:
        if self.sink is None:
            return
        self.sink.on_step(StepStats(
            time=time.time(), duration_s=self.step_s, num_prefill_tokens=0, num_decode_tokens=num_running,
            num_running=num_running, num_waiting=len(self.waiting), kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.kv_blocks_total,
            running_banks=tuple(s.req.bank for s in self.running.values() if s.req.bank),
            waiting_banks=tuple(s.req.bank for s in self.waiting if s.req.bank), routing=routing))


class BankAdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FakeBanks:
    """A ``BankAdmin`` in memory: paths must lie under ``root`` and exist; ``busy`` can't be unloaded."""

    def __init__(self, root):
        self.root = str(root)
        self.loaded: dict[str, SimpleNamespace] = {}

    def list(self):
        return list(self.loaded.values())

    async def load(self, name: str, path: str, *, pinned: bool = True):
        import os

        real = os.path.realpath(path)
        if not (real + "/").startswith(os.path.realpath(self.root) + "/"):
            raise BankAdminError(400, f"bank path {path!r} is outside the allowed folders")
        if not os.path.exists(real):
            raise BankAdminError(404, f"bank path {path!r} does not exist")
        old = self.loaded.get(name)
        info = SimpleNamespace(name=name, kind="dynmole", num_experts=4, version=(old.version + 1) if old else 1)
        self.loaded[name] = info
        return info

    async def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise BankAdminError(404, f"no bank named {name!r}")
        if name == "busy":
            raise BankAdminError(409, "bank 'busy' is in use")
        del self.loaded[name]
