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
