"""The reference: routed LoRA in plain PyTorch, short and obviously right (and differentiable).

Every other backend is tested against this one.  It gathers each token's expert weights per k, so it
is memory-hungry at prefill shapes; it is a reference, not a serving path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.pairs import PairPlan


def scaling_vector(scaling: float | Tensor, num_slots: int, device: torch.device) -> Tensor:
    """`scaling` (a float, or one value per slot) as fp32 [S]."""
    if isinstance(scaling, Tensor):
        return scaling.to(device=device, dtype=torch.float32).reshape(num_slots)
    return torch.full((num_slots,), float(scaling), dtype=torch.float32, device=device)


def routed_lora_torch(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    slots: Tensor,
    weights: Tensor,
    scaling: float | Tensor,
    *,
    plan: PairPlan | None = None,
) -> Tensor:
    """out[t] = sum_k weights[t,k] * scaling[s] * lora_b[s] @ (lora_a[s] @ x[t]),  s = slots[t,k].

    x [T, d_in], lora_a [S, r, d_in], lora_b [S, d_out, r], slots int [T, K] (-1 = nothing),
    weights [T, K], scaling float or [S].  Returns [T, d_out] in x.dtype, accumulated in fp32.
    `plan` is accepted for signature parity and ignored.
    """
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)
    xf = x.float()
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    for k in range(slots.shape[1]):
        s = slots[:, k].long()
        used = s >= 0
        s = s.clamp(min=0)
        h = torch.einsum("trd,td->tr", lora_a[s].float(), xf)  # [T, r]
        y = torch.einsum("tor,tr->to", lora_b[s].float(), h)  # [T, d_out]
        out = out + (weights[:, k].float() * scale[s] * used).unsqueeze(-1) * y
    return out.to(x.dtype)
