"""Greedy decoding with an adapter step over the simple KV cache (tests, benchmarks, tools).

``server.model.generate.greedy_generate`` without adapters is the same loop; this one takes a
factory for the step's ``AdapterStep`` (given the step's per-token sequence indices), so a factor
bank can serve some sequences of the batch and not others.
"""

from __future__ import annotations

from typing import Callable

import torch

from server.model import SequenceKVCache, StepContext, step_context


@torch.inference_mode()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int,
                  adapters: Callable[[torch.Tensor], object] | None = None) -> list[list[int]]:
    """Greedy continuation of every prompt (no EOS stop), all sequences in one flat batch per step.
    ``adapters(seq_of_token [T] int64) -> AdapterStep | None`` is called once per step."""
    cache = SequenceKVCache(model.config)
    seq_ids = list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        lens = [len(f) for f in feed]
        step = cache.step(seq_ids, lens)
        ids = torch.tensor([t for f in feed for t in f], dtype=torch.long, device=model.device)
        seq_of = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lens)).to(model.device)
        last = torch.tensor(lens, device=model.device).cumsum(0) - 1
        ctx = StepContext(positions=step.positions().to(model.device), attention=step, logits_indices=last,
                          adapters=None if adapters is None else adapters(seq_of))
        with step_context(ctx):
            nxt = model(ids).argmax(-1).tolist()
        for i, tok in enumerate(nxt):
            outputs[i].append(tok)
            feed[i] = [tok]
    return outputs
