"""Training losses (ALGORITHMS.md §1, §2). Every function takes an optional token mask so padded
batches can use them; the trainer's flat batches have no padding and pass the real-token mask.

Shapes: R routers (layers x targets, concatenated), T tokens, N experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy. logits [L, vocab] at the positions that predict ``targets`` [L]."""
    return F.cross_entropy(logits.float(), targets)


def _token_weights(mask: Tensor | None, t: int, device) -> Tensor:
    if mask is None:
        return torch.ones(t, device=device)
    return mask.to(device=device, dtype=torch.float32)


def entropy_loss(entropy: Tensor, mask: Tensor | None = None) -> Tensor:
    """DynMoLE's entropy loss: mean of the normalised router entropy over real (router, token) pairs.

    entropy [R, T] fp32 (``kernels.tsallis_entropy`` of each router's softmax); mask [T] bool.
    """
    w = _token_weights(mask, entropy.shape[-1], entropy.device).expand_as(entropy)
    return (entropy * w).sum() / w.sum().clamp_min(1)


def dynmole_balance_loss(weights: Tensor, probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """DynMoLE's load balance ``N * sum_i f_i * P_i`` over the concatenated (router, token) rows.

    weights [R, T, N]: masked routing weights (``kernels.dynamic_route``'s first output);
    probs [R, T, N]: full softmax probabilities; mask [T] bool.
    f_i = mean over real rows of weights[..., i] (a soft fraction), P_i = mean of probs[..., i].
    """
    n = probs.shape[-1]
    w = _token_weights(mask, probs.shape[-2], probs.device)[None, :, None]
    count = (w.sum() * probs.shape[0]).clamp_min(1)
    f = (weights * w).sum((0, 1)) / count
    p = (probs * w).sum((0, 1)) / count
    return n * (f * p).sum()


def mixtral_balance_loss(logits: Tensor, top_k: int, mask: Tensor | None = None) -> Tensor:
    """Mixtral/MixLoRA load balance over the concatenated per-layer router logits.

    logits [R, T, N] (one block router per layer); mask [T] bool. With p = softmax(logits) and
    m[k, i] = 1 when expert i is a token's k-th choice:
        loss = N * sum_{k, i} mean_tokens(m[k, i]) * mean_tokens(p_i)
    (``transformers``' ``load_balancing_loss_func``, which MixLoRA's release follows).
    """
    n = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(probs, min(top_k, n), dim=-1).indices  # [R, T, k]
    expert_mask = F.one_hot(chosen, n).float()  # [R, T, k, N]
    w = _token_weights(mask, logits.shape[-2], logits.device)[None, :]
    count = (w.sum() * logits.shape[0]).clamp_min(1)
    tokens_per_expert = (expert_mask * w[..., None, None]).sum((0, 1)) / count  # [k, N]
    prob_per_expert = (probs * w[..., None]).sum((0, 1)) / count  # [N]
    return n * (tokens_per_expert * prob_per_expert[None, :]).sum()
