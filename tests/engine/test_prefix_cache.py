"""Prefix caching in the engine: the same outputs and log-probabilities as without it, per bank version."""

from __future__ import annotations

import pytest
import torch

from adapters.runtime import BankRegistry
from server.engine.protocol import GenerationRequest, SamplingParams
from tests.adapters.bank_builders import fingerprint_of, write_peft_lora
from tests.stats_sink import RecordingSink

BS = 16


def _prompts(vocab, seed=0, prefix_len=40, n=4):
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=gen).tolist()
    return [prefix + torch.randint(3, vocab, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


def _greedy(rid, prompt, bank=None, **kw):
    kw.setdefault("max_tokens", 6)
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0.0, ignore_eos=True, logprobs=3, **kw),
                             bank=bank)


def _outputs(events):
    return ([t for e in events for t in e.token_ids],
            [(lp.logprob, lp.top) for e in events for lp in (e.logprobs or ())])


def _assert_same(a, b):
    ta, la = _outputs(a)
    tb, lb = _outputs(b)
    assert ta == tb
    for (x, tx), (y, ty) in zip(la, lb):
        assert abs(x - y) < 1e-4 and [t for t, _ in tx] == [t for t, _ in ty]


def _run_rounds(engine, prompts, banks):
    """Each prompt under each bank, in two rounds: the second round finds the first's blocks."""
    out = {}
    for rnd in range(2):
        reqs = [_greedy(f"{rnd}-{i}-{b}", p, b) for i, p in enumerate(prompts) for b in banks]
        out.update({k: v for k, v in engine.generate(reqs).items()})
    return out


@pytest.fixture
def bank_dir(tmp_path, tiny_model_dir):
    write_peft_lora(tmp_path / "kv", fingerprint_of(tiny_model_dir), targets=("q_proj", "k_proj", "v_proj"), seed=1)
    write_peft_lora(tmp_path / "ffn", fingerprint_of(tiny_model_dir), targets=("gate_proj", "down_proj"), seed=2)
    write_peft_lora(tmp_path / "kv2", fingerprint_of(tiny_model_dir), targets=("q_proj", "k_proj", "v_proj"), seed=3)
    return tmp_path


def _with_banks(engine, root, names=("kv", "ffn")):
    registry = BankRegistry(engine.model_config, allowed_roots=[root], dtype=torch.float32)
    for name in names:
        registry.load_sync(name, root / name)
    engine.set_adapter_provider(registry)
    return registry


def test_same_greedy_outputs_and_logprobs_with_and_without_caching(make_engine, bank_dir):
    """Base, a bank adapting k/v and one adapting only the FFN (which still changes later layers'
    k/v), interleaved in one batch; the cached run reuses blocks and matches the uncached one."""
    runs = {}
    for caching in (False, True):
        engine = make_engine(block_size=BS, enable_prefix_caching=caching)
        _with_banks(engine, bank_dir)
        sink = RecordingSink()
        engine.set_stats_sink(sink)
        runs[caching] = _run_rounds(engine, _prompts(engine.model_config.vocab_size), [None, "kv", "ffn"])
        if caching:
            assert sink.hits >= 3 * 4 * 32  # each bank's second round hits its two prefix blocks at least
        else:
            assert sink.hits == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert runs[False].keys() == runs[True].keys()
    for rid in runs[False]:
        _assert_same(runs[False][rid], runs[True][rid])
    # and a block computed for one bank never served another: the banks' outputs differ
    assert _outputs(runs[True]["1-0-kv"])[0] != _outputs(runs[True]["1-0-None"])[0]


def test_a_reloaded_bank_does_not_reuse_the_old_versions_blocks(make_engine, bank_dir):
    prompt = _prompts(49152, seed=3, n=1)[0]
    engine = make_engine(block_size=BS)
    registry = _with_banks(engine, bank_dir, ("kv",))
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    engine.generate([_greedy("old", prompt, "kv")])
    registry.load_sync("kv", bank_dir / "kv2")  # same name, new version (other weights)
    sink.steps.clear()
    new = engine.generate([_greedy("new", prompt, "kv")])["new"]
    assert sink.hits == 0
    fresh = make_engine(block_size=BS, enable_prefix_caching=False)
    _with_banks(fresh, bank_dir, ("kv2",))
    _assert_same(new, fresh.generate([_greedy("ref", prompt, "kv2")])["ref"])
    sink.steps.clear()  # the new version's own blocks are reused
    engine.generate([_greedy("again", prompt, "kv")])
    assert sink.hits == 32


def test_prompt_logprobs_are_computed_when_the_prompt_is_cached(make_engine):
    engine = make_engine(block_size=BS)
    prompt = _prompts(engine.model_config.vocab_size, seed=4, n=1)[0]
    ref = make_engine(block_size=BS, enable_prefix_caching=False)
    want = ref.generate([_greedy("r", prompt, prompt_logprobs=True)])["r"][0].prompt_logprobs
    engine.generate([_greedy("warm", prompt)])
    got = engine.generate([_greedy("p", prompt, prompt_logprobs=True)])["p"][0].prompt_logprobs
    assert len(got) == len(prompt) - 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_loglikelihood_choices_reuse_their_context_with_the_same_scores(make_engine):
    """lm-eval's loglikelihood requests: every choice of a question is its context plus the choice,
    scored with prompt log-probabilities (k = 2 alternatives). Later choices reuse the context's
    blocks with their recorded scores; every score equals the uncached run's."""
    gen = torch.Generator().manual_seed(6)
    vocab = 49152
    reqs = []
    for q, ctx_len in enumerate((40, 53, 64)):
        context = torch.randint(3, vocab, (ctx_len,), generator=gen).tolist()
        for c in range(3):
            choice = torch.randint(3, vocab, (2 + 3 * c,), generator=gen).tolist()
            reqs.append((f"q{q}c{c}", context + choice))

    def run(engine):
        sink = RecordingSink()
        engine.set_stats_sink(sink)
        out = {}
        for rid, prompt in reqs:  # one at a time, as lm-eval with batch size 1 sends them
            [first, *_] = engine.generate([_greedy(rid, prompt, max_tokens=1, prompt_logprobs=True)])[rid]
            out[rid] = first
        return out, sink

    ref, ref_sink = run(make_engine(block_size=BS, enable_prefix_caching=False))
    got, sink = run(make_engine(block_size=BS))
    assert sink.hits >= 2 * (32 + 48 + 48) and sink.prefill < ref_sink.prefill
    for rid, _ in reqs:
        torch.testing.assert_close(torch.tensor(got[rid].prompt_logprobs), torch.tensor(ref[rid].prompt_logprobs),
                                   atol=1e-4, rtol=1e-4)
        assert [[t for t, _ in top] for top in got[rid].prompt_top] == [[t for t, _ in top] for top in ref[rid].prompt_top]
    # a request wanting more alternatives than the records hold computes its prompt
    engine = make_engine(block_size=BS)
    engine.generate([_greedy("a", reqs[0][1], max_tokens=1, prompt_logprobs=True)])
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    engine.generate([GenerationRequest("b", reqs[1][1], SamplingParams(max_tokens=1, logprobs=5, prompt_logprobs=True))])
    assert sink.hits == 0


def test_choices_sent_together_compute_their_context_once(make_engine):
    """A harness's batch: every choice of every question submitted at once. The first choice of a
    question computes the context; the others wait a step for its blocks instead of computing
    them again, and every score equals the uncached run's."""
    gen = torch.Generator().manual_seed(7)
    vocab = 49152
    reqs = []
    for q, ctx_len in enumerate((40, 53, 70)):
        context = torch.randint(3, vocab, (ctx_len,), generator=gen).tolist()
        for c in range(4):
            reqs.append(_greedy(f"q{q}c{c}", context + torch.randint(3, vocab, (2 + c,), generator=gen).tolist(),
                                max_tokens=1, prompt_logprobs=True))

    def run(engine):
        sink = RecordingSink()
        engine.set_stats_sink(sink)
        return engine.generate([GenerationRequest(r.request_id, list(r.prompt_token_ids), r.params) for r in reqs]), sink

    ref, ref_sink = run(make_engine(block_size=BS, enable_prefix_caching=False))
    got, sink = run(make_engine(block_size=BS))
    context_blocks = sum((n - 1) // BS for n in (40, 53, 70))  # full blocks short of the last token
    assert sink.hits >= 3 * BS * context_blocks  # choices 2-4 of each question take every context block
    assert sink.prefill <= ref_sink.prefill - 3 * BS * context_blocks
    for r in reqs:
        a, b = got[r.request_id][0], ref[r.request_id][0]
        torch.testing.assert_close(torch.tensor(a.prompt_logprobs), torch.tensor(b.prompt_logprobs), atol=1e-4, rtol=1e-4)
        assert a.token_ids == b.token_ids


def test_preemption_with_a_small_cache_keeps_outputs(make_engine):
    """A cache too small for the batch: preempted sequences come back through the prefix cache."""
    from server.engine.kv_cache import bytes_per_block

    probe = make_engine(block_size=BS)
    block = bytes_per_block(probe.model_config, BS, torch.float32)
    prompts = _prompts(probe.model_config.vocab_size, seed=5, prefix_len=48, n=4)
    reqs = lambda tag: [_greedy(f"{tag}{i}", p, max_tokens=40) for i, p in enumerate(prompts)]  # noqa: E731
    ref = make_engine(block_size=BS, enable_prefix_caching=False).generate(reqs("a"))
    engine = make_engine(block_size=BS, kv_cache_memory=14 * block, max_num_batched_tokens=64)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    got = engine.generate(reqs("a"))
    assert sum(s.num_preempted for s in sink.steps) > 0 and sink.hits > 0
    for rid in ref:
        _assert_same(ref[rid], got[rid])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
