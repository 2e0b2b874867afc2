"""``n`` > 1 choices: forked after the prompt (computed once), blocks shared, seeds seed + j."""

from __future__ import annotations

import torch

from server.engine.protocol import GenerationRequest, SamplingParams
from tests.stats_sink import RecordingSink

BS = 16


def _prompt(n, seed=0, vocab=49152):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _by_choice(events):
    out = {}
    for e in events:
        out.setdefault(e.index, []).append(e)
    return out


def _tokens(events):
    return [t for e in events for t in e.token_ids]


def test_seeded_choices_equal_single_requests_seeded_seed_plus_j(make_engine):
    prompt = _prompt(37)  # a partial last block: each choice copies it before writing
    params = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    engine = make_engine(block_size=BS)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    events = engine.generate([GenerationRequest("g", prompt, SamplingParams(seed=7, **params), n=3)])["g"]
    choices = _by_choice(events)
    assert sorted(choices) == [0, 1, 2]
    assert all(evs[-1].finished and sum(e.finished for e in evs) == 1 for evs in choices.values())
    assert sum(s.num_prefill_tokens for s in sink.steps) == len(prompt)  # the prompt ran once
    [req] = sink.requests
    assert req.completion_tokens == 36 and req.prompt_tokens == len(prompt)
    ref = make_engine(block_size=BS, enable_prefix_caching=False)
    for j in range(3):
        single = ref.generate([GenerationRequest(f"s{j}", prompt, SamplingParams(seed=7 + j, **params))])[f"s{j}"]
        assert _tokens(choices[j]) == _tokens(single)
    assert len({tuple(_tokens(c)) for c in choices.values()}) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_choices_share_the_prompt_blocks(make_engine):
    prompt = _prompt(64, seed=1)  # four full blocks
    engine = make_engine(block_size=BS)
    engine.add_request(GenerationRequest("g", prompt, SamplingParams(max_tokens=8, ignore_eos=True), n=4))
    engine.step()  # the prompt, then the fork
    engine.step()  # every choice writes its first token: one new block each
    assert engine.num_running == 4
    assert engine.block_manager.num_used_blocks == 4 + 4
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_and_early_finish_end_every_choice(make_engine):
    engine = make_engine(block_size=BS)
    engine.add_request(GenerationRequest("a", _prompt(20), SamplingParams(max_tokens=30, ignore_eos=True), n=3))
    engine.step()
    engine.step()
    events = engine.abort("a")
    assert sorted(e.index for e in events) == [0, 1, 2] and all(e.finish_reason == "abort" for e in events)
    # aborted before its prompt ran: the pending choices end with it
    engine.add_request(GenerationRequest("b", _prompt(20), SamplingParams(max_tokens=30), n=2))
    assert sorted(e.index for e in engine.abort("b")) == [0, 1]
    # max_tokens 1: choice 0 ends at its first token, in the step its choices fork
    out = engine.generate([GenerationRequest("c", _prompt(20), SamplingParams(max_tokens=1), n=3)])["c"]
    assert sorted(e.index for e in out if e.finished) == [0, 1, 2]
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_choices_survive_preemption(make_engine):
    from server.engine.kv_cache import bytes_per_block

    probe = make_engine(block_size=BS)
    block = bytes_per_block(probe.model_config, BS, torch.float32)
    params = dict(max_tokens=26, temperature=0.8, ignore_eos=True)
    prompt = _prompt(40, seed=2)
    ref = make_engine(block_size=BS).generate([GenerationRequest(f"s{j}", prompt, SamplingParams(seed=3 + j, **params))
                                               for j in range(4)])  # seeded: batch-independent
    want = [_tokens(ref[f"s{j}"]) for j in range(4)]
    engine = make_engine(block_size=BS, kv_cache_memory=9 * block)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    got = _by_choice(engine.generate([GenerationRequest("g", prompt, SamplingParams(seed=3, **params), n=4)])["g"])
    assert sum(s.num_preempted for s in sink.steps) > 0
    assert [_tokens(got[j]) for j in range(4)] == want
