"""The pair plan: which (token, expert slot) pairs a routed LoRA call computes, grouped by slot.

Built once per step and router, then read by every `routed_lora` call that uses that routing (the
shrink and the expand, and gate/up/down when they share a router).

A *slot* indexes the expert pool `lora_a [S, r, d_in]` / `lora_b [S, d_out, r]`; a bank's experts
occupy consecutive slots starting at its `bank_offset`, so expert e of a token's bank is slot
`bank_offset[t] + e`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairPlan:
    """Routing for one call, in two forms.

    Per token (the `routed_lora` contract):
      slots   [T, K] int64, -1 = no pair;  weights [T, K] fp32.  K = max pairs of any token.
    Per pair, sorted by slot (what the segmented kernels read); P pairs, G distinct slots:
      pair_token [P] int64 (the inverse map: row of x / out), pair_slot [P] int64, pair_weight [P] fp32,
      seg_slot [G] int64, seg_start [G] int64, seg_len [G] int64: pairs
      seg_start[g] : seg_start[g] + seg_len[g] all use slot seg_slot[g].
    """

    slots: Tensor
    weights: Tensor
    pair_token: Tensor
    pair_slot: Tensor
    pair_weight: Tensor
    seg_slot: Tensor
    seg_start: Tensor
    seg_len: Tensor
    max_seg_len: int

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.pair_token.shape[0]

    @property
    def num_segments(self) -> int:
        return self.seg_slot.shape[0]


def plan_from_slots(slots: Tensor, weights: Tensor, num_slots: int | None = None) -> PairPlan:
    """Group the pairs of `slots [T, K]` / `weights [T, K]` by slot (slot -1 = no pair).

    Pairs with slot >= 0 are kept even when their weight is 0 (they contribute 0).  Within a slot,
    pairs stay in token order (a stable sort), so results are deterministic.

    With `num_slots` (the pool's slot count) the plan has static sizes and is built without a host
    sync (the GPU path, where a sync per routed linear would stall the layer loop): P = T*K pairs of
    which the invalid ones sort last (weight 0, slot clamped to the last; no segment covers them), G = num_slots segments (empty ones
    have seg_len 0), and max_seg_len = T (a bound: a slot holds at most one pair per token).
    """
    if num_slots is not None:
        return _static_plan(slots, weights, num_slots)
    t, k = slots.shape
    slots = slots.long()
    weights = weights.float()
    flat = slots.reshape(-1)
    valid = flat >= 0
    # Invalid pairs sort to the end; one sort gives both the grouping and the inverse map.
    key = torch.where(valid, flat, torch.iinfo(torch.int64).max)
    sorted_key, order = torch.sort(key, stable=True)
    p = int(valid.sum())
    order = order[:p]
    pair_slot = sorted_key[:p]
    seg_slot, seg_len = torch.unique_consecutive(pair_slot, return_counts=True)
    return PairPlan(
        slots=slots,
        weights=weights,
        pair_token=torch.div(order, max(k, 1), rounding_mode="floor"),
        pair_slot=pair_slot,
        pair_weight=weights.reshape(-1)[order],
        seg_slot=seg_slot,
        seg_start=seg_len.cumsum(0) - seg_len,
        seg_len=seg_len,
        max_seg_len=int(seg_len.max()) if seg_len.numel() else 0,
    )


def _static_plan(slots: Tensor, weights: Tensor, num_slots: int) -> PairPlan:
    t, k = slots.shape
    slots = slots.long()
    flat = slots.reshape(-1)
    key = torch.where(flat >= 0, flat, num_slots)  # invalid pairs: a sentinel slot that sorts last
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    seg_len = counts[:num_slots]
    w = torch.where(flat >= 0, weights.float().reshape(-1), 0.0)
    return PairPlan(
        slots=slots,
        weights=weights.float(),
        pair_token=torch.div(order, max(k, 1), rounding_mode="floor"),
        pair_slot=sorted_key.clamp_max(num_slots - 1),  # the tail's weights are 0; no segment reads it
        pair_weight=w[order],
        seg_slot=torch.arange(num_slots, device=slots.device),
        seg_start=seg_len.cumsum(0) - seg_len,
        seg_len=seg_len,
        max_seg_len=t,
    )


def slots_from_dense(weights: Tensor, bank_offset: Tensor, static: bool = False) -> tuple[Tensor, Tensor]:
    """Dense routing weights [T, E] + per-token bank slot offset [T] (-1 = no bank) ->
    (slots [T, K] int64, weights [T, K] fp32), dropping zero weights, K = max pairs of any token
    (at least 1).  A token's pairs are ordered by decreasing weight; unused entries are slot -1.
    `static`: K = E, known without a host sync (the GPU path).
    """
    w = weights.float()
    bank_offset = bank_offset.to(device=w.device, dtype=torch.int64)
    used = (w != 0) & (bank_offset >= 0).unsqueeze(-1)
    if static:
        k = max(w.shape[-1], 1)
    else:
        k = max(int(used.sum(-1).max()) if w.numel() else 0, 1)
    top_w, expert = torch.topk(torch.where(used, w, float("-inf")), k, dim=-1)
    keep = top_w > float("-inf")
    slots = torch.where(keep, bank_offset.unsqueeze(-1) + expert, -1)
    return slots, torch.where(keep, top_w, 0.0)


def plan_from_dense(weights: Tensor, bank_offset: Tensor, num_slots: int | None = None) -> PairPlan:
    """`slots_from_dense` then `plan_from_slots`: the plan a DynMoLE / top-k layer builds per step
    (static sizes, no host sync, with `num_slots`)."""
    return plan_from_slots(*slots_from_dense(weights, bank_offset, static=num_slots is not None), num_slots)
