"""Run our model with a registry's AdapterStep, outside and inside the engine."""

from __future__ import annotations

import torch

from adapters.runtime import BankRegistry
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.protocol import GenerationRequest, SamplingParams
from server.model import SequenceKVCache, StepContext, step_context


@torch.no_grad()
def flat_logits(model, registry: BankRegistry, prompts: list[torch.Tensor], banks: list[str | None]) -> list[torch.Tensor]:
    """Every position's logits of every prompt, all prompts in one flat batch: [len_i, vocab] each."""
    handles = [registry.acquire(b) if b else None for b in banks]
    try:
        cache = SequenceKVCache(model.config)
        lens = [len(p) for p in prompts]
        step = cache.step(list(range(len(prompts))), lens)
        adapters = registry.build_step(handles, lens)
        with step_context(StepContext(positions=step.positions(), attention=step, adapters=adapters)):
            return list(model(torch.cat(prompts)).split(lens))
    finally:
        for h in handles:
            registry.release(h)


def make_engine(model_dir, registry: BankRegistry | None, **overrides) -> LLMEngine:
    cfg = dict(model=model_dir, device="cpu", dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=32,
               max_num_batched_tokens=512)
    cfg.update(overrides)
    engine = LLMEngine(EngineConfig(**cfg))
    if registry is not None:
        engine.set_adapter_provider(registry)
    return engine


def greedy_request(rid: str, prompt: list[int], bank: str | None, max_tokens: int, logprobs: int | None = None):
    return GenerationRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                               logprobs=logprobs), bank=bank)


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.token_ids]
