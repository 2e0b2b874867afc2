"""Which intermediate neurons form each expert: balanced clustering into E groups of I / E.

Two feature choices (ALGORITHMS.md §4): ``weights`` clusters the normalised gate and up rows of each
neuron (no data needed); ``coact`` clusters each neuron's activation magnitudes over calibration
tokens, so neurons that fire together land in the same expert and a token's FFN mass concentrates
in few experts. ``contiguous`` is the plain slicing of the release (identity permutation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("coact", "weights", "contiguous")


def balanced_kmeans(features: Tensor, groups: int, *, iters: int = 12, seed: int = 0) -> Tensor:
    """Spherical k-means with equal cluster sizes. features [N, D] (N divisible by groups) ->
    labels int64 [N], each of 0..groups-1 exactly N / groups times.

    Assignment is greedy on cosine similarity: (point, centroid) pairs in descending order, each
    point to the best centroid that still has room.
    """
    n = features.shape[0]
    if n % groups:
        raise ValueError(f"{n} points do not split into {groups} equal groups")
    x = F.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:groups]].clone()
    labels = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(x @ centroids.t(), n // groups)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, labels, x), dim=1)
    return labels


def _balanced_assign(sims: Tensor, capacity: int) -> Tensor:
    """Rounds of: every unassigned point bids for its best centroid with room; each centroid takes
    its most similar bidders up to its room. At most ``groups`` rounds of ``groups`` small ops."""
    n, groups = sims.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = [capacity] * groups
    sims = sims.clone()
    while True:
        free = (labels < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return labels
        best_sim, best = sims.index_select(0, free).max(dim=1)
        for g in range(groups):
            bidders = (best == g).nonzero().squeeze(1)
            if bidders.numel() == 0 or room[g] == 0:
                continue
            take = bidders[torch.topk(best_sim[bidders], min(room[g], bidders.numel())).indices]
            labels[free[take]] = g
            room[g] -= take.numel()
            if room[g] == 0:
                sims[:, g] = float("-inf")


def permutation_from_labels(labels: Tensor) -> Tensor:
    """labels [I] -> permutation int64 [I]: the neurons of group 0 (in index order), then group 1, ..."""
    return torch.sort(labels * labels.shape[0] + torch.arange(labels.shape[0])).indices


def weight_features(gate_up: Tensor) -> Tensor:
    """gate_up [2I, H] -> [I, 2H]: each neuron's normalised gate row next to its normalised up row."""
    gate, up = gate_up.float().chunk(2, dim=0)
    return torch.cat([F.normalize(gate, dim=1), F.normalize(up, dim=1)], dim=1)


def coactivation_features(x: Tensor, gate_up: Tensor) -> Tensor:
    """x [T, H] calibration FFN inputs, gate_up [2I, H] -> [I, T]: |silu(g) * u| of each neuron per token."""
    gate, up = F.linear(x.float(), gate_up.float()).chunk(2, dim=1)
    return (F.silu(gate) * up).abs().t()


def choose_permutation(method: str, groups: int, gate_up: Tensor, x: Tensor | None = None, *, seed: int = 0) -> Tensor:
    """The neuron permutation int64 [I] for one layer (``x``: calibration FFN inputs, for ``coact``)."""
    inter = gate_up.shape[0] // 2
    if method == "contiguous" or groups == 1:
        return torch.arange(inter)
    if method == "weights":
        features = weight_features(gate_up)
    elif method == "coact":
        if x is None:
            raise ValueError("coact permutation needs calibration inputs")
        features = coactivation_features(x, gate_up)
    else:
        raise ValueError(f"unknown permutation method {method!r} (known: {', '.join(METHODS)})")
    return permutation_from_labels(balanced_kmeans(features, groups, seed=seed))
