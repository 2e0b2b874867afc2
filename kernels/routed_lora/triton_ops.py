"""The GPU path of routed LoRA: segmented (SGMV-style) shrink and expand Triton kernels.

    shrink:  h[p, :]          = lora_a[s_p] @ x[t_p]                              [P, r] fp32
    expand:  out[t_p, :]     += coef_p * lora_b[s_p] @ h[p],  coef_p = w_p * scaling[s_p]

over the pairs of a `PairPlan` (sorted by slot).  The launch grid is (segment, row tile[, column
tile]): one program per BLOCK_M pairs of one slot, so a decode batch with a few pairs per slot fills
a 16-row tile instead of padding the batch to 64 rows; programs past their segment's end exit at
once.  Tokens appear in several segments, so the expand accumulates into an fp32 output with atomics.

fp16, bf16 and fp32 inputs; fp32 uses IEEE dots (no TF32) so it matches the reference to 1e-4.
Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported).
Not fused yet: shrink + expand (and gate + up) in one launch are the next step once measured on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.pairs import PairPlan, plan_from_slots
from kernels.routed_lora.torch_ops import scaling_vector


# The interpreter computes 16-bit dots wrongly (numpy has no bf16), so there every dot is fp32 IEEE.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, pair_token_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    d_in, r, stride_xt, stride_as, stride_ar,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    g = tl.program_id(0)
    m = tl.program_id(1)
    seg_len = tl.load(seg_len_ptr + g)
    if m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + g)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seg_len
    pair = tl.load(seg_start_ptr + g) + offs_m
    tok = tl.load(pair_token_ptr + pair, mask=row_ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :],
                     mask=row_ok[:, None] & (kk[None, :] < d_in), other=0.0)  # [M, K]
        at = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + kk[:, None],
                     mask=(offs_r[None, :] < r) & (kk[:, None] < d_in), other=0.0)  # [K, R]
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(h_ptr + pair[:, None] * r + offs_r[None, :], acc,
             mask=row_ok[:, None] & (offs_r[None, :] < r))


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, out_ptr, pair_token_ptr, pair_coef_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    d_out, r, stride_bs, stride_bo, stride_br, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    g = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + g)
    if m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + g)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seg_len
    pair = tl.load(seg_start_ptr + g) + offs_m
    tok = tl.load(pair_token_ptr + pair, mask=row_ok, other=0)
    coef = tl.load(pair_coef_ptr + pair, mask=row_ok, other=0.0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < d_out
    h = tl.load(h_ptr + pair[:, None] * r + offs_r[None, :],
                mask=row_ok[:, None] & (offs_r[None, :] < r), other=0.0)  # [M, R] fp32
    bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bo + offs_r[:, None] * stride_br,
                 mask=(offs_r[:, None] < r) & col_ok[None, :], other=0.0)  # [R, N]
    if IEEE:
        y = tl.dot(h, bt.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(h.to(bt.dtype), bt)
    y = y * coef[:, None]
    tl.atomic_add(out_ptr + tok[:, None] * stride_ot + offs_n[None, :], y,
                  mask=row_ok[:, None] & col_ok[None, :])


def _block_m(max_seg_len: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(max_seg_len, 1))))


def lora_shrink(x: Tensor, lora_a: Tensor, plan: PairPlan) -> Tensor:
    """h[p] = lora_a[seg slot] @ x[pair_token[p]] for every pair of `plan`.  x [T, d_in] (unit
    column stride), lora_a [S, r, d_in] (unit last stride).  Returns fp32 [P, r]."""
    r, d_in = lora_a.shape[1], lora_a.shape[2]
    h = torch.empty(plan.num_pairs, r, dtype=torch.float32, device=x.device)
    if plan.num_pairs == 0:
        return h
    block_m = _block_m(plan.max_seg_len)
    grid = (plan.num_segments, triton.cdiv(plan.max_seg_len, block_m))
    _shrink_kernel[grid](
        x, lora_a, h, plan.pair_token, plan.seg_slot, plan.seg_start, plan.seg_len,
        d_in, r, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_K=min(128, max(16, triton.next_power_of_2(d_in))), IEEE=_INTERPRETED or x.dtype == torch.float32,
    )
    return h


def lora_expand(h: Tensor, lora_b: Tensor, plan: PairPlan, coef: Tensor, out: Tensor) -> Tensor:
    """out[pair_token[p]] += coef[p] * lora_b[seg slot] @ h[p].  h fp32 [P, r], lora_b
    [S, d_out, r] (any strides), coef fp32 [P], out fp32 [T, d_out] (accumulated in place)."""
    d_out, r = lora_b.shape[1], lora_b.shape[2]
    if plan.num_pairs == 0:
        return out
    block_m, block_n = _block_m(plan.max_seg_len), 64
    grid = (plan.num_segments, triton.cdiv(plan.max_seg_len, block_m), triton.cdiv(d_out, block_n))
    _expand_kernel[grid](
        h, lora_b, out, plan.pair_token, coef, plan.seg_slot, plan.seg_start, plan.seg_len,
        d_out, r, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
        IEEE=_INTERPRETED or lora_b.dtype == torch.float32,
    )
    return out


def routed_lora_triton(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    weights: Tensor,
    scaling: float | Tensor,
    *,
    plan: PairPlan | None = None,
) -> Tensor:
    """Same contract as `routed_lora_torch`: shrink over the plan's segments, then expand."""
    if plan is None:
        plan = plan_from_slots(slots, weights)
    x = x if x.stride(-1) == 1 else x.contiguous()
    lora_a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)
    coef = plan.pair_weight * scale[plan.pair_slot]
    h = lora_shrink(x, lora_a, plan)
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    lora_expand(h, lora_b, plan, coef, out)
    return out.to(x.dtype)
