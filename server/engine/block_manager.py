"""Paged KV cache bookkeeping: which fixed-size blocks each sequence holds, shared where possible.

The cache tensors themselves live in ``kv_cache.py``; this only hands out block ids. A sequence of
n tokens holds ceil(n / block_size) blocks, in order, in ``Sequence.block_table``.

Blocks are reference-counted, so several sequences may hold the same block:

- **Prefix caching.** Once a block is full and computed, it is registered under a hash of its
  parent block's hash, its token ids and its *extra keys*: the bank and its version
  (``Sequence.cache_key``, None for a sequence that must not share blocks; an adapter changes the hidden states and so the keys and values of every
  later layer) and the ``cache_key`` of every multimodal span (``Sequence.mm_spans``) overlapping
  the block. A new sequence whose leading full blocks hash the same reuses them instead of
  computing them; at least its last token is always computed, for its logits. A block whose last
  holder lets go keeps its contents and hash and stays findable until it is needed for new data:
  free blocks are reused least recently freed first, blocks holding no cached data before those.
- **Prompt log-probabilities** (``echo`` + ``logprobs``, loglikelihood evaluation): a block computed
  by a request that asked for them keeps a record: the log-probabilities (and top alternatives) of
  its tokens, and the final hidden state at its last position, from which the log-probability of the
  next block's first token is one ``lm_head`` row away. A request asking for them reuses only blocks
  with a record (of at least its number of alternatives), so every position it scores is either
  recorded or computed.
- **Forks** (``n`` > 1): a choice forked after the prompt shares all of the prompt's blocks; the
  last, partial block is copied when a holder first writes into it while it is shared (copy on
  write; ``take_copies`` hands the copies to the model runner, which makes them before the step).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .sequence import Sequence


@dataclass
class PromptLogprobRecord:
    """What a cached block keeps for prompt log-probabilities: ``logprobs[i]`` (and ``top[i]``, k
    alternatives each) of the block's tokens in order (block 0: from its second token), and
    ``hidden`` [hidden_size], the final normed hidden state at the block's last position."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    k: int
    hidden: Any


def block_hash(parent: bytes | None, token_ids: list[int], extra_keys: tuple) -> bytes:
    """The identity of a full block: everything that shaped its keys and values (a cryptographic
    hash, so that one client cannot craft a prompt whose blocks collide with another's)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(array("q", token_ids).tobytes())
    h.update(repr(extra_keys).encode())
    return h.digest()


def block_extra_keys(seq: Sequence, start: int, end: int) -> tuple:
    """The extra keys of the block over token positions [start, end) of ``seq``: its bank key, and
    the cache key of every multimodal span overlapping the block."""
    spans = tuple(s.cache_key for s in getattr(seq, "mm_spans", ()) if s.offset < end and s.offset + s.length > start)
    return (seq.cache_key, spans) if spans else (seq.cache_key,)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the block holding it
        self._records: list[PromptLogprobRecord | None] = [None] * num_blocks
        # Blocks nobody holds, in reuse order: uncached ones first, then cached ones least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._copies: list[tuple[int, int]] = []  # (source, destination) copies not yet made
        # prefix-cache statistics, in tokens (vLLM's ``prefix_cache_queries`` / ``_hits``); the engine reads them per step
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached contents included: they are reusable at once)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    # --- prefix caching ------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of ``seq``'s first ``num_blocks`` full blocks (computed once, kept on the sequence)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            j = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[j * bs:(j + 1) * bs],
                                     block_extra_keys(seq, j * bs, (j + 1) * bs)))
        return hashes[:num_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks ``seq`` (holding no blocks yet) can start from: its leading full blocks
        whose hashes are cached, short of its last token (always computed, for its logits) and of any
        prompt position whose log-probability it asked for and does not have yet. No side effects."""
        if not self.enable_prefix_caching or seq.block_table or seq.cache_key is None:
            return []
        bs, want, k = self.block_size, seq.params.prompt_logprobs, seq.params.logprobs or 0
        hits = []
        for j, h in enumerate(self._hashes(seq, (len(seq) - 1) // bs)):
            block = self._cached.get(h)
            if block is None:
                break
            if want and (j + 1) * bs - 1 >= len(seq.prompt_logprobs):  # scores of its tokens still needed
                record = self._records[block]
                if record is None or record.k < k:
                    break
            hits.append(block)
        return hits

    def pending_hashes(self, seqs) -> set[bytes]:
        """Hashes of the full prompt blocks that ``seqs`` (running, still in prefill) will compute
        and have not registered yet: a waiting request whose next block is one of them does better
        to wait a step and take it from the cache than to compute it a second time."""
        if not self.enable_prefix_caching:
            return set()
        out: set[bytes] = set()
        for seq in seqs:
            n = (len(seq) - 1) // self.block_size
            if seq.cache_key is None or seq.num_computed_tokens >= len(seq) - 1 or seq.num_registered_blocks >= n:
                continue
            out.update(self._hashes(seq, n)[seq.num_registered_blocks:])
        return out

    def waits_for(self, seq: Sequence, cached: list[int], pending: set[bytes]) -> bool:
        """Whether the first block of ``seq`` past its ``cached`` prefix is being computed by another
        sequence now (``pending``): then ``seq`` should wait for it rather than compute it too."""
        j = len(cached)
        if not pending or seq.cache_key is None or j >= (len(seq) - 1) // self.block_size:
            return False
        return self._hashes(seq, j + 1)[j] in pending

    def cache_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that became full and computed (after a step)."""
        if not self.enable_prefix_caching or seq.cache_key is None:
            return
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = seq.num_registered_blocks
        for j, h in enumerate(self._hashes(seq, n_full)[start:], start):
            block = seq.block_table[j]
            if self._hash[block] is None and h not in self._cached:  # else: an equal block is cached already
                self._hash[block] = h
                self._cached[h] = block
            self._record(seq, j, self._cached.get(h))
        seq.num_registered_blocks = max(start, n_full)

    def _record(self, seq: Sequence, j: int, block: int | None) -> None:
        """Keep ``seq``'s prompt log-probabilities of its block ``j`` with the cached ``block``."""
        hidden = seq.block_end_hidden.pop(j, None)
        lo, hi = max(j * self.block_size - 1, 0), (j + 1) * self.block_size - 1  # entries of prompt_logprobs
        k = seq.params.logprobs or 0
        if block is None or hidden is None or len(seq.prompt_logprobs) < hi or (k and len(seq.prompt_top) < hi):
            return
        old = self._records[block]
        if old is None or old.k < k:
            self._records[block] = PromptLogprobRecord(seq.prompt_logprobs[lo:hi], seq.prompt_top[lo:hi] if k else [],
                                                       k, hidden)

    def _take_fresh(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:  # evict its cached contents
            self._hash[block] = None
            self._records[block] = None
            if self._cached.get(h) == block:
                del self._cached[h]
        self._refs[block] = 1
        return block

    # --- allocation ----------------------------------------------------------------------------
    def _cow_needed(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether growing ``seq`` to ``num_tokens`` computed tokens writes into a partial block it shares."""
        first = seq.num_computed_tokens
        if num_tokens <= first or first % self.block_size == 0:
            return False
        j = first // self.block_size
        return j < len(seq.block_table) and self._refs[seq.block_table[j]] > 1

    def blocks_needed(self, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> int:
        """Free blocks ``seq`` takes so that its first ``num_tokens`` tokens fit, starting from the
        cached blocks ``cached`` when it holds none yet (those no one else holds count too)."""
        new = max(0, -(-num_tokens // self.block_size) - len(seq.block_table) - len(cached))
        return new + sum(1 for b in cached if self._refs[b] == 0) + self._cow_needed(seq, num_tokens)

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> bool:
        return self.blocks_needed(seq, num_tokens, cached) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> None:
        """Grow ``seq.block_table`` to hold ``num_tokens`` tokens (the caller checked can_allocate).

        ``cached``: from ``cached_prefix`` for a sequence holding no blocks yet; they are taken first
        and their tokens count as computed (``seq.num_computed_tokens`` moves past them)."""
        need = self.blocks_needed(seq, num_tokens, cached)
        if need > len(self._free):
            raise RuntimeError(f"KV cache: {need} blocks needed, {len(self._free)} free")
        if cached:
            assert not seq.block_table, "cached blocks start a sequence's table"
            for b in cached:
                if self._refs[b] == 0:
                    del self._free[b]
                self._refs[b] += 1
            seq.block_table.extend(cached)
            seq.num_computed_tokens = len(cached) * self.block_size
            seq.num_registered_blocks = len(cached)
            seq.num_cached_tokens += seq.num_computed_tokens
            if seq.params.prompt_logprobs:
                self._restore_prompt_logprobs(seq, cached)
        if self._cow_needed(seq, num_tokens):
            j = seq.num_computed_tokens // self.block_size
            src = seq.block_table[j]
            self._refs[src] -= 1
            seq.block_table[j] = self._take_fresh()
            self._copies.append((src, seq.block_table[j]))
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_fresh())

    def _restore_prompt_logprobs(self, seq: Sequence, cached: list[int]) -> None:
        """Fill the prompt log-probabilities of ``seq``'s cached positions from their blocks' records;
        the first computed token's comes from the last cached position's hidden state, next step."""
        bs, k = self.block_size, seq.params.logprobs or 0
        have = len(seq.prompt_logprobs)
        for j, block in enumerate(cached):
            lo, hi = max(j * bs - 1, 0), (j + 1) * bs - 1
            if hi <= have:
                continue
            record = self._records[block]
            seq.prompt_logprobs.extend(record.logprobs[have - lo:])
            if k:
                seq.prompt_top.extend(top[:k] for top in record.top[have - lo:])
            have = hi
        if have == len(cached) * bs - 1:
            seq.pending_prompt_hidden = self._records[cached[-1]].hidden

    def count_query(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Statistics: a sequence admitted for its first computation looked up its tokens."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += len(seq)
            self.num_hit_tokens += num_hit_tokens

    def take_copies(self) -> list[tuple[int, int]]:
        """Block copies (source, destination) the next step must make before it writes."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (its computed tokens, e.g. the prompt)."""
        assert not child.block_table
        for b in parent.block_table:
            self._refs[b] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        """Let go of every block of ``seq`` (finish, abort, preemption). Its cached blocks stay findable;
        the tail ones are reused first (freed in reverse: a prefix is worth more than its end)."""
        for b in reversed(seq.block_table):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.pending_prompt_hidden = None
