"""The scheduler's token-budget policy: decodes first, a per-sequence prefill cap, admission beside a
long prefill, and preemption that takes back what an earlier pass scheduled."""

from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.protocol import GenerationRequest, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence


def _seq(rid: str, n: int, first: int = 1) -> Sequence:
    return Sequence(GenerationRequest(rid, list(range(first, first + n)), SamplingParams(max_tokens=64)))


def _run(sched: Scheduler, batch) -> None:
    """What the engine does after a step: advance every chunk, sample where the chunk reached the end."""
    for seq, k in zip(batch.seqs, batch.num_tokens):
        seq.num_computed_tokens += k
        if seq.num_computed_tokens == len(seq):
            seq.append_token(7)


def _decoding(sched: Scheduler, n: int) -> list[Sequence]:
    seqs = [_seq(f"d{i}", 4) for i in range(n)]
    for s in seqs:
        sched.add(s)
    _run(sched, sched.schedule())  # prompts in, one token out each: all decode from now on
    return seqs


def test_decodes_first_and_long_prefill_capped():
    sched = Scheduler(BlockManager(1024, 16), max_num_seqs=16, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    long = _seq("long", 1000)
    sched.add(long)
    first = sched.schedule()
    assert first.num_tokens == [64]  # alone: the whole budget
    _run(sched, first)
    streams = _decoding(sched, 3)
    short = _seq("short", 5)
    sched.add(short)
    batch = sched.schedule()
    got = dict(zip((s.request_id for s in batch.seqs), batch.num_tokens))
    # the 3 decodes first, the long prompt's chunk capped, the short prompt admitted in the same step
    assert [s.request_id for s in batch.seqs[:3]] == ["d0", "d1", "d2"]
    assert got == {"d0": 1, "d1": 1, "d2": 1, "long": 16, "short": 5}
    assert batch.num_decode_tokens == 3 and batch.num_prefill_tokens == 21
    assert all(s in batch.seqs for s in streams)


def test_cap_zero_is_the_old_policy():
    sched = Scheduler(BlockManager(1024, 16), max_num_seqs=16, max_num_batched_tokens=64, long_prefill_token_threshold=0)
    sched.add(_seq("long", 1000))
    _run(sched, sched.schedule())
    sched.add(_seq("short", 5))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["long"] and batch.num_tokens == [64]  # the short one waits


def test_short_request_waits_one_step_not_the_whole_prefill():
    sched = Scheduler(BlockManager(4096, 16), max_num_seqs=16, max_num_batched_tokens=512,
                      long_prefill_token_threshold=128)
    long = _seq("long", 8000)
    sched.add(long)
    _run(sched, sched.schedule())
    short = _seq("short", 2)
    sched.add(short)
    steps = 0
    while short.num_output_tokens < 1:
        _run(sched, sched.schedule())
        steps += 1
    assert steps == 1 and long.num_computed_tokens < len(long)


def test_preemption_takes_back_a_scheduled_decode():
    # 4 blocks of 4 tokens: two sequences of 7 tokens hold 2 blocks each; the newer one decodes,
    # the older one needs a third block for its next chunk, so the newer one is preempted.
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, long_prefill_token_threshold=0)
    old, new = _seq("old", 6), _seq("new", 7, first=100)  # no shared prefix: both are admitted at once
    sched.add(old)
    sched.add(new)
    _run(sched, sched.schedule())  # old: 6 tokens + 1 sampled = 7; new: 7 + 1 = 8 (2 blocks each)
    old.token_ids.extend([9] * 5)  # old still has 6 tokens of prefill-like work to compute (a resumed prompt)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["old"] and [s.request_id for s in batch.preempted] == ["new"]
    assert batch.num_decode_tokens == 0 and batch.num_prefill_tokens == batch.num_tokens[0]
    assert new.status.value == "waiting" and new.block_table == [] and sched.waiting[0] is new
    assert bm.num_used_blocks == len(old.block_table)


def test_a_request_waits_for_the_prefix_block_another_is_computing():
    """B shares A's first two blocks and arrives with it: B waits one step (in its place in the
    queue) and then starts from A's cached blocks; C, sharing nothing, is not held back by B."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, long_prefill_token_threshold=0)
    a, b, c = _seq("a", 10), _seq("b", 10), _seq("c", 10, first=100)
    b.token_ids[-1] = 99  # same first 9 tokens as a, its own last one
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "c"] and list(sched.waiting) == [b]
    _run(sched, batch)
    for s in batch.seqs:
        bm.cache_blocks(s)
    batch = sched.schedule()
    assert "b" in [s.request_id for s in batch.seqs]
    assert b.num_computed_tokens == 8 and batch.num_tokens[[s.request_id for s in batch.seqs].index("b")] == 2
