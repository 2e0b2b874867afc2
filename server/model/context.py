"""The per-step context: batch metadata built once per engine step and read by the layers.

The model runner sets it around one forward (``with step_context(ctx): model(...)``); attention and
the adapter hook points read it with ``get_step_context()`` instead of receiving it through every
layer's signature (the same pattern as nano-vllm's ``get_context``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


class AttentionStep(Protocol):
    """Attention over the KV cache for one step's flat batch, bound to that step's metadata.

    ``forward(layer, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, H, D]`` stores the new keys
    and values of every token in the cache, then attends each token causally over its own
    sequence's cached context (including itself).
    """

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class AdapterStep(Protocol):
    """What the hook points call to add adapter work for one step's batch.

    ``linear(layer, targets, x [T, in], out [T, sum(out_sizes)])`` adds, in place, the deltas of
    every bank present in the batch for the fused projection made of ``targets`` (e.g.
    ``("q_proj", "k_proj", "v_proj")``); a token with no bank gets nothing.
    ``mlp(layer, x [T, hidden], mlp) -> [T, hidden] | None`` lets block-level adapters (MixLoRA,
    FactorLLM) replace the FFN output; None means the dense FFN with per-linear hooks runs.
    """

    def linear(self, layer: int, targets: tuple[str, ...], x: torch.Tensor, out: torch.Tensor) -> None: ...

    def mlp(self, layer: int, x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor | None: ...


@dataclass
class StepContext:
    """Metadata of one forward over a flat batch of T tokens from many sequences.

    positions: [T] int64, each token's position in its sequence.
    attention: the step's attention, already bound to block tables / sequence boundaries.
    adapters: the step's adapter work (token -> bank -> expert slots), or None for base-only steps.
    logits_indices: [L] int64 rows whose logits are wanted (e.g. each sequence's last token);
        None means every row.
    input_embeds: (rows [R] int64, embeds [R, hidden]): rows whose input embeddings are precomputed
        (an image's visual tokens) instead of looked up from their token ids; None: none.
    """

    positions: torch.Tensor
    attention: AttentionStep
    adapters: AdapterStep | None = None
    logits_indices: torch.Tensor | None = None
    input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None


_local = threading.local()


def get_step_context() -> StepContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("no step context: run the model inside `with step_context(ctx):`")
    return ctx


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous
