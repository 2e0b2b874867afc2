"""Routers: DynMoLE hybrid routing and MixLoRA-style top-k (ALGORITHMS.md §2 and §1).

All math is fp32 and vectorised over tokens; each router is a handful of torch ops so it can run
once per (router, step) inside the serving loop.  Weights come back dense, [T, E]; turn them into a
pair plan for `routed_lora` with `kernels.pairs.plan_from_dense`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Param = float | int | Tensor  # a scalar for the whole batch, or one value per token ([T])


def tsallis_entropy(probs: Tensor, q: float | Tensor, eps: float = 1e-5) -> Tensor:
    """Normalised Tsallis entropy of `probs` over its last dim (N classes).

        H_q(p) = (1 - sum_i (p_i + eps)^q) / (1 - N^(1-q))      (q != 1; the (q-1) factors cancel)
        H_1(p) = -sum_i p_i log p_i / log N                      (Shannon, 0 log 0 = 0)

    eps is added to p without renormalising, as in the DynMoLE release.  `q` may be a float or a
    tensor broadcastable to probs.shape[:-1] (one q per token).  Returns fp32 of shape probs.shape[:-1].
    """
    p = probs.float()
    n = p.shape[-1]
    if n <= 1:
        return torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
    if not isinstance(q, Tensor):
        if q == 1:
            return -torch.special.xlogy(p, p).sum(-1) / math.log(n)
        return (1.0 - (p + eps).pow(q).sum(-1)) / (1.0 - n ** (1.0 - q))
    q = q.to(device=p.device, dtype=torch.float32)
    shannon = -torch.special.xlogy(p, p).sum(-1) / math.log(n)
    is_one = q == 1
    q_safe = torch.where(is_one, torch.full_like(q, 2.0), q)  # avoid 0/0 on the discarded branch
    tsallis = (1.0 - (p + eps).pow(q_safe.unsqueeze(-1)).sum(-1)) / (1.0 - n ** (1.0 - q_safe))
    return torch.where(is_one, shannon, tsallis)


def _per_token(v: Param, like: Tensor) -> Tensor | float:
    """A scalar stays a Python number; a tensor becomes fp32 [T, 1] for broadcasting over experts."""
    if isinstance(v, Tensor):
        return v.to(device=like.device, dtype=torch.float32).reshape(-1, 1)
    return v


def dynamic_route(
    logits: Tensor,
    *,
    top_p: Param = 0.75,
    keep_top_k: Param = 2,
    entropy_threshold: Param = 0.9,
    q: Param = 1.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """DynMoLE hybrid routing (ALGORITHMS.md §2).

    logits: [T, E] router outputs (any float dtype; the math is fp32).
    For each token, with p = softmax(logits):
      keep expert j (in descending-p order) when cumsum_j <= top_p   (the crossing expert is NOT kept),
      always keep the keep_top_k most probable experts,
      keep all experts when H_q(p) > entropy_threshold (broadcast; off when q <= 0 or threshold >= 1).
    Returns (weights [T, E] fp32 = p * mask, not renormalised;  entropy [T] fp32 = H_q(p)).

    Every parameter may be a scalar or a [T] tensor (one value per token), so one call can route a
    batch that mixes banks with different settings.

    On the CPU without autograd (serving), one C++ call computes the same thing
    (``kernels.routed_lora.cpu_ops.dynamic_route_cpu``); ``dynamic_route_torch`` is the torch version.
    """
    if logits.device.type == "cpu" and not (torch.is_grad_enabled() and logits.requires_grad):
        from kernels.routed_lora.cpu_ops import dynamic_route_cpu

        out = dynamic_route_cpu(logits, top_p, keep_top_k, entropy_threshold, q, eps)
        if out is not None:
            return out
    return dynamic_route_torch(logits, top_p=top_p, keep_top_k=keep_top_k, entropy_threshold=entropy_threshold,
                               q=q, eps=eps)


def dynamic_route_torch(
    logits: Tensor,
    *,
    top_p: Param = 0.75,
    keep_top_k: Param = 2,
    entropy_threshold: Param = 0.9,
    q: Param = 1.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``dynamic_route`` as torch ops (any device, autograd through the kept probabilities)."""
    p = torch.softmax(logits.float(), dim=-1)
    t, e = p.shape
    entropy = tsallis_entropy(p, q.reshape(-1) if isinstance(q, Tensor) else q, eps)

    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    rank = torch.arange(e, device=p.device)
    keep_sorted = sorted_p.cumsum(-1) <= _per_token(top_p, p)
    keep_sorted |= rank < _per_token(keep_top_k, p)
    mask = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)

    if isinstance(q, Tensor) or isinstance(entropy_threshold, Tensor):
        thr = _per_token(entropy_threshold, p)
        qq = _per_token(q, p)
        broadcast = (entropy.unsqueeze(-1) > thr) & (torch.as_tensor(qq) > 0) & (torch.as_tensor(thr) < 1)
        mask |= broadcast
    elif q > 0 and entropy_threshold < 1:
        mask |= (entropy > entropy_threshold).unsqueeze(-1)
    return p * mask, entropy


def topk_route(logits: Tensor, k: int, renormalize: bool = True) -> Tensor:
    """MixLoRA / MoLA top-k routing.

    logits: [T, E].  Returns fp32 weights [T, E]: the softmax probabilities of each token's k most
    probable experts (renormalised to sum to 1 when `renormalize`), zero elsewhere.
    """
    p = torch.softmax(logits.float(), dim=-1)
    k = min(k, p.shape[-1])
    top_w, top_i = torch.topk(p, k, dim=-1)
    if renormalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, top_i, top_w)
