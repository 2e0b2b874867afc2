"""The auxiliary losses against a plain restatement of their formulas, with padding masks."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.train.losses import dynmole_balance_loss, entropy_loss, lm_loss, mixtral_balance_loss
from kernels import dynamic_route, tsallis_entropy


def _fixed(r=3, t=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(r, t, n, generator=g) * 2
    mask = torch.tensor([True, True, False, True, False])[:t]
    return logits, mask


def test_entropy_loss_is_the_mean_over_real_router_token_pairs():
    logits, mask = _fixed()
    p = torch.softmax(logits, -1)
    ent = tsallis_entropy(p, 1.1)
    values = [float(ent[r, t]) for r in range(3) for t in range(5) if mask[t]]
    assert float(entropy_loss(ent, mask)) == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert float(entropy_loss(ent)) == pytest.approx(float(ent.mean()), rel=1e-6)


def test_tsallis_entropy_matches_its_formula():
    p = torch.tensor([0.7, 0.2, 0.1, 0.0])
    q, eps, n = 1.1, 1e-5, 4
    h = (1 - sum((x + eps) ** q for x in p.tolist())) / (q - 1)
    h_max = (1 - n ** (1 - q)) / (q - 1)
    assert float(tsallis_entropy(p, q, eps)) == pytest.approx(h / h_max, rel=1e-5)


def test_dynmole_balance_is_n_sum_f_times_p_over_real_rows():
    logits, mask = _fixed()
    r, t, n = logits.shape
    p = torch.softmax(logits, -1)
    w, _ = dynamic_route(logits.reshape(-1, n))
    w = w.reshape(r, t, n)
    rows = [(i, j) for i in range(r) for j in range(t) if mask[j]]
    f = [sum(float(w[i, j, e]) for i, j in rows) / len(rows) for e in range(n)]
    big_p = [sum(float(p[i, j, e]) for i, j in rows) / len(rows) for e in range(n)]
    expected = n * sum(fi * pi for fi, pi in zip(f, big_p))
    assert float(dynmole_balance_loss(w, p, mask)) == pytest.approx(expected, rel=1e-6)
    # Padding rows change nothing: garbage there is ignored.
    w2, p2 = w.clone(), p.clone()
    w2[:, ~mask] = 7.0
    p2[:, ~mask] = 3.0
    assert float(dynmole_balance_loss(w2, p2, mask)) == pytest.approx(expected, rel=1e-6)


def test_mixtral_balance_matches_transformers_formula():
    logits, mask = _fixed()
    r, t, n = logits.shape
    k = 2
    rows = [(i, j) for i in range(r) for j in range(t) if mask[j]]
    p = torch.softmax(logits, -1)
    total = 0.0
    for slot in range(k):
        for e in range(n):
            frac = sum(1.0 for i, j in rows if int(torch.topk(p[i, j], k).indices[slot]) == e) / len(rows)
            prob = sum(float(p[i, j, e]) for i, j in rows) / len(rows)
            total += frac * prob
    assert float(mixtral_balance_loss(logits, k, mask)) == pytest.approx(n * total, rel=1e-6)
    # Unmasked equals transformers' load_balancing_loss_func on the same logits.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ref = load_balancing_loss_func(tuple(logits), n, k)
    assert float(mixtral_balance_loss(logits, k)) == pytest.approx(float(ref), rel=1e-5)


def test_balanced_uniform_router_gives_one():
    logits = torch.zeros(2, 6, 4)
    assert float(mixtral_balance_loss(logits, 4)) == pytest.approx(4.0)  # N * sum over k slots of 1 * 1/N
    w = torch.full((2, 6, 4), 0.25)
    assert float(dynmole_balance_loss(w, w)) == pytest.approx(1.0)


def test_lm_loss_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(1 / (2 + math.e))) / 2
    assert float(lm_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
