"""Continuous batching with chunked prefill: which tokens of which sequences run in the next step.

Every step builds one flat batch under a token budget (``max_num_batched_tokens``) and a sequence
cap (``max_num_seqs``), in three passes: first one decode token for every running sequence that has
finished its prompt, then the next prefill chunk of every running sequence that has not, then
waiting sequences in FIFO order, each admitted with a chunk of its prompt. While other sequences are
running or waiting, one sequence's prefill chunk is capped at ``long_prefill_token_threshold``
tokens (vLLM's flag of that name; 0: no cap), so a context-length prompt takes a share of each step
instead of all of it: running streams keep their pace and a short request is admitted at once,
beside it (a sequence alone in the engine still prefills with the whole budget).

When the cache has no block left for a running sequence, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the waiting queue to
be recomputed later (its outputs are kept). One sequence always fits in the whole cache (the engine
caps max_model_len to it), so preemption cannot deadlock.

A sequence admitted without blocks first takes the cached blocks of its prefix (prefix caching,
``BlockManager.cached_prefix``): only the tokens after them count against the budget. One whose next
uncached block a running sequence is computing now waits in its place until that block is cached
(``BlockManager.waits_for``), so requests sharing a prefix that arrive together compute it once. A request with
``n`` > 1 choices is admitted when the running batch has room for all of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes its next ``num_tokens[i]`` uncomputed tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy (source, destination) first

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of either queue and free its blocks (finish or abort)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.forks = []
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start the pending choice ``child`` from ``parent``'s computed prompt (their blocks shared)."""
        self.block_manager.fork(parent, child)
        parent.forks.remove(child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        if seq in batch.seqs:  # scheduled by an earlier pass of this step: take it out again
            i = batch.seqs.index(seq)
            n = batch.num_tokens[i]
            del batch.seqs[i], batch.num_tokens[i]
            if self._is_decode(seq, n):
                batch.num_decode_tokens -= n
            else:
                batch.num_prefill_tokens -= n
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens ``seq`` computes this step: all it has left, within the budget and, while other
        sequences share the engine, within the long-prefill cap."""
        n = min(seq.num_uncomputed_tokens, budget)
        cap = self.long_prefill_token_threshold
        if cap and n > cap and len(self.running) + len(self.waiting) > 1:
            n = cap
        return n

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Running sequences, decodes before prefill chunks (a preemption may remove a sequence
        # either pass already scheduled; its tokens go back to the budget).
        for decode in (True, False):
            for seq in [s for s in self.running if (s.num_uncomputed_tokens == 1) == decode]:
                if budget <= 0:
                    break
                if seq.status is not SequenceStatus.RUNNING:  # preempted meanwhile
                    continue
                n = self._chunk(seq, budget)
                while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                    victim = self.running.pop()  # the newest running sequence goes back to waiting
                    if victim in batch.seqs:
                        budget += batch.num_tokens[batch.seqs.index(victim)]
                    self._preempt(victim, batch)
                    if victim is seq:
                        break
                else:
                    bm.allocate(seq, seq.num_computed_tokens + n)
                    self._add(batch, seq, n)
                    budget -= n

        # Then waiting sequences, with what is left. No admission in a step that had to preempt:
        # the cache is full.
        # A waiting sequence whose next uncached block another sequence is computing now (requests
        # sharing a prefix that arrive together, e.g. a harness's choices of one question) waits in
        # its place until that block is cached, instead of computing it a second time.
        pending = bm.pending_hashes(self.running) if self.waiting else set()
        held: list[Sequence] = []
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.forks and len(self.running) + 1 + len(seq.forks) > self.max_num_seqs:
                break
            cached = bm.cached_prefix(seq)
            if bm.waits_for(seq, cached, pending):
                held.append(self.waiting.popleft())
                continue
            start = len(cached) * bm.block_size if cached else seq.num_computed_tokens
            n = min(self._chunk(seq, budget), len(seq) - start)
            if not bm.can_allocate(seq, start + n, cached):
                break
            self.waiting.popleft()
            bm.count_query(seq, start)
            bm.allocate(seq, start + n, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add(batch, seq, n)
            budget -= n
            pending |= bm.pending_hashes([seq])
        self.waiting.extendleft(reversed(held))
        batch.copies = bm.take_copies()
        return batch

    @staticmethod
    def _is_decode(seq: Sequence, n: int) -> bool:
        """``n`` tokens of ``seq`` are its newest sampled token; anything else is (re)prefill."""
        return n == 1 and seq.num_output_tokens > 0 and seq.num_computed_tokens == len(seq) - 1

    @classmethod
    def _add(cls, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        if cls._is_decode(seq, n):
            batch.num_decode_tokens += 1
        else:
            batch.num_prefill_tokens += n
