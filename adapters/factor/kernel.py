"""The factorised FFN: routing, the sparse (pair-segmented) computation, and its dense reference.

Expert e of a SwiGLU FFN split into E experts along the intermediate dimension (m = I / E neurons
each, after a neuron permutation) is

    expert_e(x) = Wd_e (silu(Wg_e x) * (Wu_e x)),   Wg_e, Wu_e [m, H] rows, Wd_e [H, m] columns

and the sum over all e is the dense FFN. Weights are pre-packed once per bank and layer into
``w_gate_up [E, 2m, H]`` (expert e's gate rows then its up rows) and ``w_down [E, m, H]``
(expert e's columns of down, transposed), so every expert is a contiguous block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import PairPlan


def pack_experts(gate_up: Tensor, down: Tensor, permutation: Tensor, num_experts: int,
                 gate_up_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dense weights -> expert-contiguous copies.

    gate_up [2I, H] (gate rows then up rows), down [H, I], permutation int64 [I] (expert order),
    gate_up_bias [2I] | None.  Returns w_gate_up [E, 2m, H], w_down [E, m, H], bias [E, 2m] | None.
    """
    inter = down.shape[1]
    m = inter // num_experts
    idx = gate_up_columns(permutation, num_experts)
    w_gate_up = gate_up.index_select(0, idx).view(num_experts, 2 * m, -1).contiguous()
    w_down = down.index_select(1, permutation).t().reshape(num_experts, m, -1).contiguous()
    bias = None if gate_up_bias is None else gate_up_bias.index_select(0, idx).view(num_experts, 2 * m).contiguous()
    return w_gate_up, w_down, bias


def gate_up_columns(permutation: Tensor, num_experts: int) -> Tensor:
    """int64 [2I]: position j of the expert-major gate|up layout -> column of the dense [2I] gate|up."""
    inter = permutation.shape[0]
    p = permutation.view(num_experts, -1)
    return torch.cat([p, p + inter], dim=1).reshape(-1)


def factor_route(x: Tensor, router: Tensor, top_k: int, scale: float) -> tuple[Tensor, Tensor]:
    """x [T, H], router [E, H] -> (slots [T, K] int64 = each token's top-k experts by router logit,
    weights [T, K] fp32 = ``scale`` for every chosen expert: binary gates, see adapters/factor/bank.py)."""
    logits = F.linear(x.float(), router)
    slots = torch.topk(logits, top_k, dim=-1).indices
    return slots, torch.full(slots.shape, scale, dtype=torch.float32, device=x.device)


def factor_ffn(x: Tensor, w_gate_up: Tensor, w_down: Tensor, plan: PairPlan, *,
               gate_up_bias: Tensor | None = None, gate_up_delta: Tensor | None = None,
               intermediate: Tensor | None = None) -> Tensor:
    """Sparse factorised FFN: only the (token, expert) pairs of ``plan`` are computed.

        out[t] = sum_{pairs (t, e, w)} w * w_down[e]^T (silu(g) * u),  [g | u] = w_gate_up[e] x[t] (+ bias[e] + delta)

    x [T, H]; w_gate_up [E, 2m, H]; w_down [E, m, H]; plan: pairs grouped by expert (its slots are
    expert indices 0..E-1); gate_up_bias [E, 2m]; gate_up_delta [T, E*2m] an extra pre-activation
    per token in the expert-major layout (a LoRA on gate/up); intermediate [T, E*m], if given,
    receives each pair's silu(g) * u (zero where no pair) for a LoRA on down.  Returns [T, H] in
    x.dtype; a token without pairs gets 0.  One GEMM pair per segment: E segments at most.
    """
    m = w_down.shape[1]
    out = torch.zeros(x.shape[0], w_down.shape[2], dtype=torch.float32, device=x.device)
    starts, lens, experts = plan.seg_start.tolist(), plan.seg_len.tolist(), plan.seg_slot.tolist()
    for start, n, e in zip(starts, lens, experts):
        tok = plan.pair_token[start:start + n]
        h = F.linear(x.index_select(0, tok), w_gate_up[e], None if gate_up_bias is None else gate_up_bias[e])
        if gate_up_delta is not None:
            h = h + gate_up_delta[:, e * 2 * m:(e + 1) * 2 * m].index_select(0, tok)
        gate, up = h.split(m, dim=1)
        act = F.silu(gate) * up
        if intermediate is not None:
            intermediate[:, e * m:(e + 1) * m].index_copy_(0, tok, act)
        y = torch.mm(act, w_down[e]).float()
        y = y * plan.pair_weight[start:start + n].unsqueeze(1)
        out.index_put_((tok,), y, accumulate=True)  # index_add_ measured 100-1000x slower on CPU here
    return out.to(x.dtype)


def factor_ffn_reference(x: Tensor, w_gate_up: Tensor, w_down: Tensor, gates: Tensor, *,
                         gate_up_bias: Tensor | None = None) -> Tensor:
    """Dense masked reference for ``factor_ffn``: every expert for every token, weighted by the
    dense gates [T, E] (0 = not chosen).  x [T, H] -> [T, H]; fp32 math."""
    m = w_down.shape[1]
    h = torch.einsum("th,ekh->tek", x.float(), w_gate_up.float())  # [T, E, 2m]
    if gate_up_bias is not None:
        h = h + gate_up_bias.float()
    act = F.silu(h[..., :m]) * h[..., m:]
    y = torch.einsum("tem,emh->teh", act, w_down.float())  # [T, E, H]
    return (y * gates.float().unsqueeze(-1)).sum(1).to(x.dtype)


def expert_outputs(x: Tensor, w_gate_up: Tensor, w_down: Tensor, gate_up_bias: Tensor | None = None) -> Tensor:
    """Every expert's output for every token: x [T, H] -> [T, E, H] (what calibration labels from).
    Two GEMMs: the gate|up of all experts at once, then a batched down per expert."""
    e, two_m, hidden = w_gate_up.shape
    m = two_m // 2
    h = F.linear(x, w_gate_up.reshape(e * two_m, hidden)).view(-1, e, two_m)
    if gate_up_bias is not None:
        h = h + gate_up_bias
    act = F.silu(h[..., :m]) * h[..., m:]  # [T, E, m]
    return torch.bmm(act.transpose(0, 1), w_down).transpose(0, 1)  # [T, E, H]
