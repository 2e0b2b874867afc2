"""The fast CPU path of routed LoRA: a segmented shrink/expand over the pair plan.

    h[p]            = lora_a[s_p] @ x[t_p]                         (shrink, [P, r] fp32)
    out[t_p]       += weight_p * scaling[s_p] * lora_b[s_p] @ h[p]  (expand, [T, d_out] fp32)

for the pairs p of the plan, grouped by slot s so each expert's weights are read once per call.

Two implementations, chosen by measurement (BENCHMARKS.md, "Kernels"):
- a small C++ kernel (`cpu_kernel.cpp`, OpenMP, fp32/bf16 weights) compiled once with g++ and
  loaded through ctypes: one foreign call per routed linear, which is what decode steps need, where
  Python/ATen dispatch per op would cost more than the arithmetic;
- a per-segment loop of ATen matmuls, used for fp16 weights and whenever the C++ kernel is
  unavailable (no compiler, build failure, or MOLESERVE_CPU_KERNEL=0).  Measured slower than the
  C++ kernel at decode (5-9x) and at prefill (2-4x), so it is only the fallback.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from kernels.cpp_build import load_cpp_library
from kernels.pairs import PairPlan, plan_from_slots
from kernels.routed_lora.torch_ops import scaling_vector

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The C++ kernel (compiled once, cached on disk; see kernels.cpp_build); None if unavailable."""
    lib = load_cpp_library(_SOURCE, "routed_lora")
    if lib is None:
        return None
    fn = lib.routed_lora_cpu
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, p, i64, i64, ctypes.c_int, p, p, p, ctypes.c_float,
                   p, p, p, i64, p, p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    bp = lib.build_plan
    bp.argtypes = [ctypes.c_int, p, i64, p, i64, i64, i64, p, p, p, p, p, p, p, p, p]
    bp.restype = ctypes.c_int
    f32 = ctypes.c_float
    dr = lib.dynamic_route
    dr.argtypes = [p, i64, i64, i64, p, i64, p, i64, p, i64, p, i64, f32, p, p]
    dr.restype = ctypes.c_int
    return lib


def dynamic_route_cpu(logits: Tensor, top_p, keep_top_k, entropy_threshold, q, eps: float
                      ) -> tuple[Tensor, Tensor] | None:
    """``kernels.routing.dynamic_route`` in one C++ call (fp32 CPU logits [T, n], n <= 64, no autograd);
    None when it does not apply (the caller then runs the torch ops)."""
    lib = load_library()
    if lib is None or logits.dim() != 2 or logits.shape[1] > 64 or logits.shape[1] < 1:
        return None
    x = logits.float()
    if x.stride(1) != 1:
        x = x.contiguous()
    t, n = x.shape
    keep = []  # the parameter tensors stay alive through the call

    def param(v):
        a = v.to(dtype=torch.float32).reshape(-1).contiguous() if isinstance(v, Tensor) else torch.tensor([float(v)])
        if a.numel() not in (1, t):
            raise ValueError(f"dynamic_route: a per-token parameter has {a.numel()} values for {t} tokens")
        keep.append(a)
        return a.data_ptr(), int(a.numel() == t and t > 1)

    args = [*param(top_p), *param(keep_top_k), *param(entropy_threshold), *param(q)]
    w = torch.empty(t, n, dtype=torch.float32)
    ent = torch.empty(t, dtype=torch.float32)
    if t and lib.dynamic_route(x.data_ptr(), x.stride(0), t, n, *args, float(eps), w.data_ptr(), ent.data_ptr()):
        return None
    return w, ent


def build_plan_cpu(weights: Tensor, bank_offset: Tensor | None, num_slots: int, *,
                   slots: Tensor | None = None) -> PairPlan | None:
    """The pair plan in one C++ call (None when the library is unavailable: use `kernels.pairs`).

    Dense mode (``slots`` None): ``weights [T, n]`` fp32 dense routing weights (row stride may
    differ from n) and ``bank_offset [T]`` int64 (-1 = no bank) -> the plan of `plan_from_dense`,
    except that its ``slots``/``weights`` are [T, n] (-1 / 0 padded) rather than [T, max pairs].
    Slots mode: ``slots``/``weights [T, K]`` -> exactly `plan_from_slots`. All slots < num_slots.
    """
    lib = load_library()
    if lib is None or weights.device.type != "cpu":
        return None
    t, n = weights.shape
    dense = slots is None
    w = weights if weights.dtype == torch.float32 else weights.float()
    if w.stride(1) != 1:
        w = w.contiguous()
    ibuf = torch.empty(4 * t * n + 3 * num_slots + 3 if dense else 3 * t * n + 3 * num_slots + 3, dtype=torch.int64)
    fbuf = torch.empty((2 if dense else 1) * t * n, dtype=torch.float32)
    tn = t * n
    if dense:
        offs = bank_offset if bank_offset.dtype == torch.int64 else bank_offset.long()
        offs = offs.contiguous()
        sl, wk = ibuf[2 * tn + 3 * num_slots: 3 * tn + 3 * num_slots], fbuf[tn:]
    else:
        sl = slots.reshape(-1) if slots.dtype == torch.int64 and slots.is_contiguous() else slots.long().contiguous().reshape(-1)
        wk = w.contiguous().reshape(-1)
        offs = None
    seg = ibuf[2 * tn: 2 * tn + 3 * num_slots]
    counts = ibuf[ibuf.numel() - 3:]
    rc = lib.build_plan(int(dense), w.data_ptr() if dense else None, w.stride(0) if dense else 0,
                        offs.data_ptr() if dense else None, t, n, num_slots, sl.data_ptr(), wk.data_ptr(),
                        ibuf.data_ptr(), ibuf[tn:].data_ptr(), fbuf.data_ptr(), seg.data_ptr(),
                        seg[num_slots:].data_ptr(), seg[2 * num_slots:].data_ptr(), counts.data_ptr())
    if rc != 0:
        raise RuntimeError(f"build_plan failed with code {rc}")
    p, g, m = counts.tolist()
    return PairPlan(slots=sl.view(t, n), weights=wk.view(t, n), pair_token=ibuf[:p], pair_slot=ibuf[tn: tn + p],
                    pair_weight=fbuf[:p], seg_slot=seg[:g], seg_start=seg[num_slots: num_slots + g],
                    seg_len=seg[2 * num_slots: 2 * num_slots + g], max_seg_len=m)


def routed_lora_cpu(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    weights: Tensor,
    scaling: float | Tensor,
    *,
    plan: PairPlan | None = None,
) -> Tensor:
    """Same contract as `routed_lora_torch`; CPU tensors.  Uses `plan` when given (it must describe
    `slots`/`weights`), otherwise builds it."""
    if plan is None:
        plan = plan_from_slots(slots, weights)
    lib = load_library()
    if (
        lib is None
        or lora_a.dtype not in (torch.float32, torch.bfloat16)
        or lora_b.dtype != lora_a.dtype
        or not lora_a.is_contiguous()
        or not (lora_b.is_contiguous() or lora_b.transpose(1, 2).is_contiguous())
    ):
        return segment_loop(x, lora_a, lora_b, plan, scaling)
    return _call_kernel(lib, x, lora_a, lora_b, plan, scaling)


def _call_kernel(lib, x, lora_a, lora_b, plan: PairPlan, scaling) -> Tensor:
    t, d_in = x.shape
    _, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    xf = x.float().contiguous()
    if isinstance(scaling, Tensor):
        scale = scaling.float().contiguous()
        scale_ptr, scale_scalar = scale.data_ptr(), 0.0
    else:
        scale_ptr, scale_scalar = None, float(scaling)
    h = torch.empty(plan.num_pairs, r, dtype=torch.float32)
    out = torch.empty(t, d_out, dtype=torch.float32)
    rc = lib.routed_lora_cpu(
        xf.data_ptr(), t, d_in, lora_a.data_ptr(), lora_b.data_ptr(), r, d_out,
        32 if lora_a.dtype == torch.float32 else 16,
        plan.pair_token.data_ptr(), plan.pair_weight.data_ptr(), scale_ptr, scale_scalar,
        plan.seg_slot.data_ptr(), plan.seg_start.data_ptr(), plan.seg_len.data_ptr(),
        plan.num_segments, h.data_ptr(), out.data_ptr(), int(not lora_b.is_contiguous()),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"routed_lora_cpu kernel failed with code {rc}")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def segment_loop(x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: PairPlan, scaling) -> Tensor:
    """One gather + two GEMMs + one scatter-add per segment (slot).  Any dtype, any device."""
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)
    xs = x.index_select(0, plan.pair_token).float()  # [P, d_in], rows in slot order
    coef = plan.pair_weight * scale[plan.pair_slot]  # [P]
    ys = torch.empty(plan.num_pairs, lora_b.shape[1], dtype=torch.float32, device=x.device)
    starts, lens, segs = plan.seg_start.tolist(), plan.seg_len.tolist(), plan.seg_slot.tolist()
    for s, p0, n in zip(segs, starts, lens):
        h = xs[p0 : p0 + n] @ lora_a[s].float().t()  # [n, r]
        h.mul_(coef[p0 : p0 + n, None])
        torch.mm(h, lora_b[s].float().t(), out=ys[p0 : p0 + n])
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, plan.pair_token, ys)
    return out.to(x.dtype)
