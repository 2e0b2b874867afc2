"""The one place a routed-LoRA backend is chosen."""

from __future__ import annotations

from torch import Tensor

from kernels.pairs import PairPlan
from kernels.routed_lora.cpu_ops import routed_lora_cpu
from kernels.routed_lora.torch_ops import routed_lora_torch

BACKENDS = ("auto", "torch", "cpu", "triton")


def _triton():
    # Imported on first use: triton decides at decoration time whether kernels are interpreted
    # (TRITON_INTERPRET=1), so importing it eagerly would freeze that choice too early.
    from kernels.routed_lora.triton_ops import routed_lora_triton

    return routed_lora_triton


def routed_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    weights: Tensor,
    scaling: float | Tensor,
    *,
    backend: str = "auto",
    plan: PairPlan | None = None,
) -> Tensor:
    """Routed (mixture-of-LoRA-experts) delta for a batch of tokens.

        out[t] = sum_k weights[t,k] * scaling[s] * lora_b[s] @ (lora_a[s] @ x[t]),  s = slots[t,k]

    x [T, d_in]; lora_a [S, r, d_in]; lora_b [S, d_out, r] (a transposed view of a contiguous
    [S, r, d_out] tensor is the fastest layout for the CPU kernel); slots int [T, K], -1 = nothing;
    weights [T, K]; scaling a float or [S].  Returns [T, d_out] in x.dtype, accumulated in fp32.
    `plan` (from `kernels.pairs`, built once per step and router) must describe slots/weights;
    without it each call builds its own.  backend: "torch" (reference), "cpu", "triton", or "auto"
    (triton on CUDA, cpu on CPU).
    """
    if backend == "auto":
        backend = "triton" if x.is_cuda else "cpu"
    if backend == "cpu":
        return routed_lora_cpu(x, lora_a, lora_b, slots, weights, scaling, plan=plan)
    if backend == "triton":
        return _triton()(x, lora_a, lora_b, slots, weights, scaling, plan=plan)
    if backend == "torch":
        return routed_lora_torch(x, lora_a, lora_b, slots, weights, scaling, plan=plan)
    raise ValueError(f"unknown routed_lora backend {backend!r}; expected one of {BACKENDS}")
