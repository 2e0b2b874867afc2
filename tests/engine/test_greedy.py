"""Greedy outputs of the engine equal the reference (one sequence at a time over the simple cache)."""

from __future__ import annotations

import torch

from server.engine.protocol import GenerationRequest, SamplingParams
from server.model.generate import greedy_generate


def _prompts(n, vocab, seed=0, lo=1, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run(engine, prompts, max_tokens):
    reqs = [GenerationRequest(f"r{i}", p, _greedy(max_tokens)) for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    return [[t for e in out[f"r{i}"] for t in e.token_ids] for i in range(len(prompts))]


def test_concurrent_equals_reference(make_engine, tiny_model):
    prompts = _prompts(12, tiny_model.config.vocab_size)
    ref = [greedy_generate(tiny_model, [p], 10)[0] for p in prompts]
    engine = make_engine(max_num_batched_tokens=64, block_size=8)
    assert _run(engine, prompts, 10) == ref
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_torch_backend_and_tiny_chunks_equal_reference(make_engine, tiny_model):
    """The torch attention path, prefill chunks of 5 tokens and 3 sequences per step give the same tokens."""
    prompts = _prompts(6, tiny_model.config.vocab_size, seed=1)
    ref = greedy_generate(tiny_model, prompts, 6)
    engine = make_engine(max_num_batched_tokens=5, max_num_seqs=3, block_size=4)
    engine.runner.backend = "torch"
    assert _run(engine, prompts, 6) == ref


def test_preemption_completes_with_unchanged_outputs(make_engine, tiny_model):
    from server.engine.kv_cache import bytes_per_block

    prompts = _prompts(16, tiny_model.config.vocab_size, seed=2, lo=20, hi=40)
    ref = greedy_generate(tiny_model, prompts, 24)  # flat batch over the simple cache
    per_block = bytes_per_block(tiny_model.config, 8, torch.float32)
    engine = make_engine(block_size=8, kv_cache_memory=20 * per_block)  # 160 tokens: ~3 requests at once
    preempted = []
    engine.set_stats_sink(type("S", (), {"on_step": lambda self, s: preempted.append(s.num_preempted),
                                         "on_request_finished": lambda self, s: None})())
    assert engine.block_manager.num_blocks == 20
    assert _run(engine, prompts, 24) == ref
    assert sum(preempted) > 0
    assert engine.block_manager.num_free_blocks == 20
