"""Plain greedy generation over the simple cache: a reference for the engine and a CLI smoke path."""

from __future__ import annotations

import torch

from .attention import SequenceKVCache
from .context import StepContext, step_context
from .llama import LlamaModel


@torch.inference_mode()
def greedy_generate(model: LlamaModel, prompts: list[list[int]], max_new_tokens: int,
                    eos_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy continuation of every prompt, all sequences in one flat batch per step."""
    cache = SequenceKVCache(model.config)
    seq_ids = list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    live = list(seq_ids)
    for _ in range(max_new_tokens):
        if not live:
            break
        lens = [len(feed[i]) for i in live]
        step = cache.step(live, lens)
        ids = torch.tensor([t for i in live for t in feed[i]], dtype=torch.long, device=model.device)
        last = torch.tensor(lens, device=model.device).cumsum(0) - 1
        ctx = StepContext(positions=step.positions().to(model.device), attention=step, logits_indices=last)
        with step_context(ctx):
            nxt = model(ids).argmax(-1).tolist()
        still = []
        for i, tok in zip(live, nxt):
            outputs[i].append(tok)
            feed[i] = [tok]
            if tok in eos_token_ids:
                cache.free(i)
            else:
                still.append(i)
        live = still
    return outputs
