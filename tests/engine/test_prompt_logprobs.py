"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``): what loglik evaluation reads."""

from __future__ import annotations

import pytest
import torch

from server.engine.protocol import GenerationRequest, SamplingParams
from server.model import SequenceKVCache, StepContext, step_context
from tests.runtime.helpers import make_engine
from tests.stats_sink import RecordingSink


def _reference(model, ids: list[int]) -> list[float]:
    cache = SequenceKVCache(model.config)
    step = cache.step([0], [len(ids)])
    with torch.inference_mode(), step_context(StepContext(positions=step.positions(), attention=step,
                                                          logits_indices=torch.arange(len(ids)))):
        logp = torch.log_softmax(model(torch.tensor(ids)).float(), -1)
    return [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def _run(engine, prompts, want):
    reqs = [GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                         prompt_logprobs=w))
            for i, (p, w) in enumerate(zip(prompts, want))]
    return {r.request_id: ev for r, ev in zip(reqs, (engine.generate(reqs)[r.request_id] for r in reqs))}


def test_prompt_logprobs_match_a_full_forward_across_chunks(tiny_model_dir):
    """Prompts longer than the token budget are prefilled in chunks; every position is scored once."""
    engine = make_engine(tiny_model_dir, None, max_num_batched_tokens=32)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine.model_config.vocab_size, (n,), generator=gen).tolist() for n in (70, 1, 9, 40)]
    events = _run(engine, prompts, [True, True, False, True])
    for i, p in enumerate(prompts):
        evs = events[f"p{i}"]
        if i == 2:
            assert all(e.prompt_logprobs is None for e in evs)
            continue
        got = evs[0].prompt_logprobs
        assert got is not None and len(got) == len(p) - 1
        assert all(e.prompt_logprobs is None for e in evs[1:])  # once, on the first event
        torch.testing.assert_close(torch.tensor(got), torch.tensor(_reference(engine.model, p)), atol=1e-4, rtol=1e-4)


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    """A KV cache too small for all requests preempts and recomputes; no position is recorded twice."""
    from server.engine.kv_cache import bytes_per_block

    probe = make_engine(tiny_model_dir, None)
    block = bytes_per_block(probe.model_config, probe.config.block_size, torch.float32)
    engine = make_engine(tiny_model_dir, None, kv_cache_memory=14 * block, max_num_batched_tokens=64)
    sink = RecordingSink()
    engine.set_stats_sink(sink)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, engine.model_config.vocab_size, (n,), generator=gen).tolist() for n in (50, 60, 45, 55)]
    reqs = [GenerationRequest(f"q{i}", p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                         prompt_logprobs=True)) for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    assert sink.preempted > 0
    for r, p in zip(reqs, prompts):
        got = out[r.request_id][0].prompt_logprobs
        assert len(got) == len(p) - 1
        torch.testing.assert_close(torch.tensor(got), torch.tensor(_reference(engine.model, p)), atol=1e-4, rtol=1e-4)


def test_prompt_top_logprobs_with_k_alternatives(tiny_model_dir):
    """With ``logprobs`` = k, each scored prompt position also gets its k most likely tokens (what an
    echo request's top_logprobs show, and what loglikelihood evaluation uses to tell greedy)."""
    engine = make_engine(tiny_model_dir, None, max_num_batched_tokens=32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, engine.model_config.vocab_size, (n,), generator=gen).tolist() for n in (45, 6)]
    ks = [3, 0]
    reqs = [GenerationRequest(f"k{i}", p, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True, logprobs=k))
            for i, (p, k) in enumerate(zip(prompts, ks))]
    out = engine.generate(reqs)
    p, first = prompts[0], out["k0"][0]
    assert len(first.prompt_top) == len(p) - 1 and all(len(t) == 3 for t in first.prompt_top)
    cache = SequenceKVCache(engine.model.config)
    step = cache.step([0], [len(p)])
    with torch.inference_mode(), step_context(StepContext(positions=step.positions(), attention=step,
                                                          logits_indices=torch.arange(len(p)))):
        logp = torch.log_softmax(engine.model(torch.tensor(p)).float(), -1)
    ref_v, ref_i = logp[:-1].topk(3, dim=-1)
    assert [[tid for tid, _ in t] for t in first.prompt_top] == ref_i.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in t] for t in first.prompt_top]), ref_v, atol=1e-4, rtol=1e-4)
    assert out["k1"][0].prompt_top is None and len(out["k1"][0].prompt_logprobs) == len(prompts[1]) - 1


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_a_prompt_scores_the_same_alone_and_in_a_batch_of_8(tiny_model_dir, quantization):
    """Batch invariance (issue #21): a quantized base serves its LM head int8 at every row count, so
    the log-probabilities of a prompt scored alone equal those it gets among 7 others (as
    lm-evaluation-harness compares batched and one-by-one scoring)."""
    gen = torch.Generator().manual_seed(1)
    alone = make_engine(tiny_model_dir, None, quantization=quantization)
    batched = make_engine(tiny_model_dir, None, quantization=quantization)
    assert (alone.model.quantization == quantization) and ((getattr(alone.model, "lm_head_quant", None) is not None) == (quantization != "none"))
    vocab = alone.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (24, 7, 40, 3, 17, 31, 12, 9)]
    together = _run(batched, prompts, [True] * 8)
    for i, p in enumerate(prompts):
        one = _run(alone, [p], [True])["p0"][0].prompt_logprobs
        many = together[f"p{i}"][0].prompt_logprobs
        assert len(one) == len(many) == len(p) - 1
        torch.testing.assert_close(torch.tensor(many), torch.tensor(one), atol=1e-5, rtol=0)
