"""Request lifecycle: abort, seeded sampling, stop strings, validation, stats, error isolation."""

from __future__ import annotations

import pytest
import torch

from server.engine.protocol import GenerationRequest, InvalidRequest, SamplingParams, UnknownBank
from tests.stats_sink import RecordingSink


def _prompt(n, seed=0, vocab=49152):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ids(events):
    return [t for e in events for t in e.token_ids]


def test_abort_mid_generation_returns_every_block(make_engine):
    engine = make_engine(block_size=4)
    start = engine.block_manager.num_free_blocks
    for i in range(4):
        engine.add_request(GenerationRequest(f"r{i}", _prompt(10 + i, i), SamplingParams(max_tokens=50, ignore_eos=True)))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < start
    [ev] = engine.abort("r1")
    assert ev.finished and ev.finish_reason == "abort" and ev.usage.completion_tokens == 5  # prefill step + 4 decode steps
    assert engine.abort("r1") == []  # unknown now
    assert engine.num_running == 3
    for i in (0, 2, 3):
        engine.abort(f"r{i}")
    assert engine.block_manager.num_free_blocks == start
    assert not engine.has_unfinished()
    engine.add_request(GenerationRequest("w", _prompt(5), SamplingParams(max_tokens=3)))
    engine.abort("w")  # waiting, never scheduled
    assert engine.block_manager.num_free_blocks == start and not engine.has_unfinished()


def test_seeded_sampling_is_batch_independent(make_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = make_engine().generate([GenerationRequest("s", _prompt(9), params)])["s"]
    engine = make_engine(max_num_batched_tokens=32)
    crowd = [GenerationRequest(f"c{i}", _prompt(5 + 3 * i, 100 + i),
                               SamplingParams(max_tokens=8 + i, temperature=0.7 + 0.1 * i, ignore_eos=True,
                                              seed=None if i % 2 else i))
             for i in range(7)]
    crowded = engine.generate(crowd[:3] + [GenerationRequest("s", _prompt(9), params)] + crowd[3:])["s"]
    assert _ids(alone) == _ids(crowded)
    assert len(_ids(alone)) == 12


def _text(events):
    return "".join(e.text for e in events)


def test_stop_string_across_token_boundary(make_engine, tiny_tokenizer):
    engine = make_engine()
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)  # varied text, reproducible
    events = engine.generate([GenerationRequest("a", _prompt(7, 5), seeded)])["a"]
    ids = _ids(events)
    full = _text(events)
    assert full == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    # a stop string made of the end of one token's text and the start of the next one's
    pieces = [tiny_tokenizer.decode(ids[:i + 1], skip_special_tokens=True) for i in range(len(ids))]
    cut = next(i for i in range(3, len(ids) - 1)
               if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2
               and full.find(full[len(pieces[i]) - 2:len(pieces[i]) + 2]) == len(pieces[i]) - 2)
    at = len(pieces[cut])
    stop = full[at - 2:at + 2]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True, stop=[stop])
    out = engine.generate([GenerationRequest("b", _prompt(7, 5), params)])["b"]
    assert _text(out) == full[:at - 2]
    assert out[-1].finish_reason == "stop"
    assert len(_ids(out)) == cut + 2  # stopped on the token that completed the stop string
    params.include_stop_str_in_output = True
    out = engine.generate([GenerationRequest("c", _prompt(7, 5), params)])["c"]
    assert _text(out) == full[:at + 2]


def test_stop_token_min_tokens_and_length(make_engine):
    engine = make_engine()
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = _ids(engine.generate([GenerationRequest("a", _prompt(6), greedy)])["a"])
    stop_tok = ids[3]
    first = ids.index(stop_tok)
    out = engine.generate([GenerationRequest("b", _prompt(6), SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]))])["b"]
    assert _ids(out) == ids[:first + 1] and out[-1].finish_reason == "stop"
    assert out[-1].usage.completion_tokens == first + 1 and out[-1].usage.prompt_tokens == 6
    out = engine.generate([GenerationRequest("c", _prompt(6), greedy)])["c"]
    assert out[-1].finish_reason == "length" and len(_ids(out)) == 10


def test_logprobs_shape(make_engine):
    engine = make_engine()
    out = engine.generate([GenerationRequest("a", _prompt(6), SamplingParams(max_tokens=3, temperature=0.0,
                                                                             logprobs=5, ignore_eos=True))])["a"]
    for e in out:
        (lp,) = e.logprobs
        assert lp.token_id == e.token_ids[0] and len(lp.top) == 5 and lp.top[0][0] == lp.token_id


def test_validation_errors_name_lengths(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(InvalidRequest, match="70 tokens.*64"):
        engine.add_request(GenerationRequest("a", _prompt(70), SamplingParams()))
    with pytest.raises(InvalidRequest, match=r"60 tokens\) plus max_tokens \(10\).*64"):
        engine.add_request(GenerationRequest("a", _prompt(60), SamplingParams(max_tokens=10)))
    with pytest.raises(InvalidRequest):
        engine.add_request(GenerationRequest("a", [], SamplingParams()))
    with pytest.raises(UnknownBank):
        engine.add_request(GenerationRequest("a", _prompt(3), SamplingParams(), bank="nope"))
    # token ids the sampler indexes the logits with (a step would fail on them) are refused at admission
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidRequest, match=f"logit_bias: token id {vocab} is out of range"):
        engine.add_request(GenerationRequest("a", _prompt(3), SamplingParams(logit_bias={5: 1.0, vocab: 2.0})))
    with pytest.raises(InvalidRequest, match="stop_token_ids: token id"):
        engine.add_request(GenerationRequest("a", _prompt(3), SamplingParams(stop_token_ids=[vocab + 1], min_tokens=2)))
    assert not engine.has_unfinished()
    # in range, the bias steers the engine's greedy tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={77: 100.0})
    assert _ids(engine.generate([GenerationRequest("b", _prompt(3), params)])["b"]) == [77] * 4


def test_stats(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    engine.generate([GenerationRequest(f"r{i}", _prompt(20, i), SamplingParams(max_tokens=4, ignore_eos=True))
                     for i in range(3)])
    assert sum(s.num_prefill_tokens for s in sink.steps) == 60
    assert sum(s.num_decode_tokens for s in sink.steps) == 3 * 3
    assert all(s.num_prefill_tokens + s.num_decode_tokens <= 16 for s in sink.steps)
    assert sink.steps[-1].kv_blocks_used == 0 and sink.steps[0].kv_blocks_total == engine.block_manager.num_blocks
    assert {r.request_id for r in sink.requests} == {"r0", "r1", "r2"}
    for r in sink.requests:
        assert r.completion_tokens == 4 and len(r.inter_token_s) == 3
        assert 0 <= r.queue_time_s <= r.ttft_s <= r.e2e_s


def test_step_error_fails_its_requests_not_the_engine(make_engine, monkeypatch):
    engine = make_engine()
    engine.add_request(GenerationRequest("a", _prompt(5), SamplingParams(max_tokens=3)))
    real = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    (ev,) = engine.step()
    assert ev.finish_reason == "error" and "boom" in ev.error
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    monkeypatch.setattr(engine.runner, "run", real)
    out = engine.generate([GenerationRequest("b", _prompt(5), SamplingParams(max_tokens=3, ignore_eos=True))])
    assert len(_ids(out["b"])) == 3


def test_repetition_penalty_reads_the_prompt_through_the_engine(make_engine):
    """The model runner hands the sampler each sequence's cached prompt tensor: a strong repetition
    penalty then keeps every prompt token (and every earlier output) out of the greedy output, where
    the same prompt without it repeats some."""
    engine = make_engine()
    prompt = _prompt(12, 5)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    plain = _ids(engine.generate([GenerationRequest("p", prompt, greedy)])["p"])
    assert any(t in prompt or t in plain[:i] for i, t in enumerate(plain)), plain  # it repeats without the penalty
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=50.0)
    got = _ids(engine.generate([GenerationRequest("q", prompt, params)])["q"])
    assert not any(t in prompt or t in got[:i] for i, t in enumerate(got)), (prompt, got)
