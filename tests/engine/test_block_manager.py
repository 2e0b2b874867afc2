"""The block manager alone: hashed blocks, reference counts, LRU reuse, forks with copy on write."""

from __future__ import annotations

from types import SimpleNamespace

from server.engine.block_manager import BlockManager, block_extra_keys
from server.engine.protocol import GenerationRequest, SamplingParams
from server.engine.sequence import Sequence

BS = 4


def _seq(tokens, cache_key=(), rid="r", prompt_logprobs=False, spans=()):
    seq = Sequence(GenerationRequest(rid, list(tokens), SamplingParams(prompt_logprobs=prompt_logprobs)),
                   cache_key=cache_key)
    if spans:
        seq.mm_spans = spans
    return seq


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` as the scheduler does and pretend its whole prompt was computed."""
    cached = bm.cached_prefix(seq)
    bm.allocate(seq, len(seq), cached)
    seq.num_computed_tokens = len(seq)
    bm.cache_blocks(seq)


def test_equal_prefixes_share_full_blocks_and_the_last_token_is_always_computed():
    bm = BlockManager(16, BS)
    a = _seq(range(10))
    _compute(bm, a)
    assert bm.num_cached_blocks == 2  # the partial third block is not cached
    b = _seq(list(range(8)) + [99, 98, 97])
    hits = bm.cached_prefix(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, len(b), hits)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.num_used_blocks == 3 + 1  # a's three, b's one new block
    # a prompt of exactly two blocks hits only the first: its last token must be computed for its logits
    assert bm.cached_prefix(_seq(range(8))) == a.block_table[:1]


def test_extra_keys_separate_banks_versions_and_image_spans():
    bm = BlockManager(16, BS)
    _compute(bm, _seq(range(9), cache_key=(("bank", 1),)))
    assert bm.cached_prefix(_seq(range(9))) == []  # base model
    assert bm.cached_prefix(_seq(range(9), cache_key=(("bank", 2),))) == []  # a reloaded version
    assert len(bm.cached_prefix(_seq(range(9), cache_key=(("bank", 1),)))) == 2
    assert bm.cached_prefix(_seq(range(9), cache_key=None)) == []  # an adapter that cannot name its version

    span = SimpleNamespace(offset=5, length=2, cache_key="img-a")
    other = SimpleNamespace(offset=5, length=2, cache_key="img-b")
    s = _seq(range(9), spans=(span,))
    assert block_extra_keys(s, 0, 4) == ((),) and block_extra_keys(s, 4, 8) == ((), ("img-a",))
    _compute(bm, s)
    assert len(bm.cached_prefix(_seq(range(9), spans=(span,)))) == 2
    hits = bm.cached_prefix(_seq(range(9), spans=(other,)))  # the same placeholder tokens, another image
    assert len(hits) == 1  # only the block before the image


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_used():
    bm = BlockManager(4, BS)
    a, b = _seq(range(9), rid="a"), _seq(range(100, 109), rid="b")
    _compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    _compute(bm, b)  # three blocks: the two holding nothing cached first, then a's tail block
    assert bm.num_cached_blocks == 3  # b's two full blocks and a's head block
    assert len(bm.cached_prefix(_seq(range(9)))) == 1
    bm.free(b)
    d = _seq(range(200, 205), rid="d")
    _compute(bm, d)  # two blocks: b's uncached partial one, then a's head (freed before b's blocks)
    assert bm.cached_prefix(_seq(range(9))) == []
    assert len(bm.cached_prefix(_seq(range(100, 109)))) == 2


def test_hits_on_free_blocks_count_against_the_free_pool():
    bm = BlockManager(3, BS)
    a = _seq(range(9))
    _compute(bm, a)
    bm.free(a)
    b = _seq(range(13))
    hits = bm.cached_prefix(b)
    assert len(hits) == 2
    assert bm.blocks_needed(b, 13, hits) == 2 + 2  # two reused free blocks and two new ones
    assert not bm.can_allocate(b, 13, hits)
    assert bm.can_allocate(b, 12, hits)


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(8, BS)
    parent, child = _seq(range(6), rid="p"), _seq(range(6), rid="p")
    _compute(bm, parent)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.num_used_blocks == 2
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert bm.blocks_needed(parent, 7) == 1  # writing position 6 into the shared partial block
    bm.allocate(parent, 7)
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[1] != child.block_table[1]
    assert bm.take_copies() == [(child.block_table[1], parent.block_table[1])]
    assert bm.blocks_needed(child, 7) == 0  # now the only holder of the old partial block
    bm.allocate(child, 7)
    assert bm.take_copies() == []
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_prompt_logprobs_limit_hits_to_recorded_positions():
    bm = BlockManager(8, BS)
    _compute(bm, _seq(range(13)))
    want = _seq(range(13), prompt_logprobs=True)
    assert bm.cached_prefix(want) == []  # every position must be computed for its log-probability
    want.prompt_logprobs = [0.0] * 9  # a preempted sequence had recorded nine of them
    assert len(bm.cached_prefix(want)) == 2


def test_caching_off_shares_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    _compute(bm, _seq(range(9)))
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(_seq(range(9))) == []
