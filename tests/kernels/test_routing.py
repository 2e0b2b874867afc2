import math

import pytest
import torch

from kernels import dynamic_route, topk_route, tsallis_entropy


def restated_route(logits, top_p, keep_top_k, threshold, q, eps=1e-5):
    """ALGORITHMS.md §2 for one token, in plain Python."""
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).tolist()
    n = len(p)
    if q == 1:
        h = -sum(v * math.log(v) for v in p if v > 0) / math.log(n)
    else:
        h = (1 - sum((v + eps) ** q for v in p)) / (q - 1) / ((1 - n ** (1 - q)) / (q - 1))
    order = sorted(range(n), key=lambda i: -p[i])
    keep, c = set(), 0.0
    for rank, i in enumerate(order):
        c += p[i]
        if c <= top_p or rank < keep_top_k:
            keep.add(i)
    if q > 0 and threshold < 1 and h > threshold:
        keep = set(range(n))
    return [p[i] if i in keep else 0.0 for i in range(n)], h


@pytest.mark.parametrize("q", [1.0, 1.1, 2.0, 0.5])
@pytest.mark.parametrize("top_p,keep_top_k,threshold", [(0.75, 2, 0.9), (0.5, 1, 0.95), (0.9, 0, 1.0)])
def test_dynamic_route_matches_restatement(q, top_p, keep_top_k, threshold):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6, generator=g) * torch.linspace(0.1, 4, 64).unsqueeze(-1)
    w, h = dynamic_route(logits, top_p=top_p, keep_top_k=keep_top_k, entropy_threshold=threshold, q=q)
    assert w.dtype == torch.float32 and h.dtype == torch.float32 and w.shape == (64, 6)
    for t in range(64):
        ew, eh = restated_route(logits[t].tolist(), top_p, keep_top_k, threshold, q)
        assert h[t].item() == pytest.approx(eh, abs=1e-5)
        torch.testing.assert_close(w[t], torch.tensor(ew, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_near_uniform_broadcasts_and_weights_sum_to_one():
    w, h = dynamic_route(torch.tensor([[0.0, 0.01, -0.01, 0.02, 0.0, 0.005]]))
    assert h.item() > 0.9
    assert (w > 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_broadcast_off_when_threshold_ge_one_or_q_le_zero():
    logits = torch.zeros(1, 6)
    for kw in ({"entropy_threshold": 1.0}, {"q": 0.0}, {"q": -1.0}):
        w, _ = dynamic_route(logits, keep_top_k=2, top_p=0.0, **kw)
        assert (w > 0).sum().item() == 2


def test_peaked_keeps_exactly_keep_top_k():
    # p ~ [0.93, 0.05, ...]: top_p keeps nothing (0.93 > 0.75), keep_top_k adds the best two.
    w, h = dynamic_route(torch.tensor([[6.0, 3.0, 0.0, 0.0, 0.0, 0.0]]), keep_top_k=2)
    assert h.item() < 0.9
    assert (w > 0).nonzero()[:, 1].tolist() == [0, 1]
    w, _ = dynamic_route(torch.tensor([[6.0, 3.0, 0.0, 0.0, 0.0, 0.0]]), keep_top_k=3)
    assert (w > 0).sum().item() == 3


def test_expert_crossing_top_p_is_excluded():
    # p = [0.4, 0.3, 0.2, 0.1]: cumsum 0.4, 0.7, 0.9 -> with top_p 0.75 the third crosses: excluded.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    w, _ = dynamic_route(logits, top_p=0.75, keep_top_k=1, entropy_threshold=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3, 0.0, 0.0]]))
    w, _ = dynamic_route(logits, top_p=0.9001, keep_top_k=1, entropy_threshold=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3, 0.2, 0.0]]))


def test_per_token_parameters_equal_grouped_scalar_calls():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 6, generator=g) * 2
    params = [dict(top_p=0.75, keep_top_k=2, entropy_threshold=0.9, q=1.1),
              dict(top_p=0.5, keep_top_k=1, entropy_threshold=1.0, q=1.0)]
    which = torch.tensor([0, 1] * 5)
    per_tok = {k: torch.tensor([float(params[i][k]) for i in which.tolist()]) for k in params[0]}
    w, h = dynamic_route(logits, **per_tok)
    for i, kw in enumerate(params):
        ew, eh = dynamic_route(logits[which == i], **kw)
        torch.testing.assert_close(w[which == i], ew)
        torch.testing.assert_close(h[which == i], eh)


def test_tsallis_entropy_range_and_shannon():
    uniform = torch.full((3, 8), 1 / 8)
    onehot = torch.eye(8)[:3]
    for q in (1.0, 1.1, 2.0):
        assert tsallis_entropy(uniform, q).sub(1).abs().max() < 1e-3
        assert tsallis_entropy(onehot, q).abs().max() < 1e-3
    p = torch.softmax(torch.randn(4, 5), -1)
    torch.testing.assert_close(tsallis_entropy(p, 1.0), -(p * p.log()).sum(-1) / math.log(5))


def test_topk_route():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w = topk_route(logits, 2)
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(w[0], torch.stack([0 * p[0], p[1], p[2], 0 * p[3]]) / (p[1] + p[2]))
    w = topk_route(logits, 2, renormalize=False)
    torch.testing.assert_close(w[0, 1:3], p[1:3])
    assert w.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 2, 6, 16])
def test_cpu_kernel_route_equals_torch_ops(n):
    """The serving path (one C++ call) equals the torch ops, scalar and per-token parameters, q = 1 too."""
    from kernels.routed_lora.cpu_ops import dynamic_route_cpu, load_library
    from kernels.routing import dynamic_route_torch

    if load_library() is None:
        pytest.skip("C++ kernel unavailable")
    g = torch.Generator().manual_seed(n)
    t = 40
    logits = torch.randn(t, n, generator=g) * torch.linspace(0.1, 6.0, t).unsqueeze(1)  # flat to peaked
    per_token = dict(top_p=torch.rand(t, generator=g), keep_top_k=torch.randint(0, 3, (t,), generator=g),
                     entropy_threshold=torch.rand(t, generator=g) * 1.2,
                     q=torch.tensor([1.0, 1.1, 2.0, 0.0] * (t // 4)))
    for params in (dict(top_p=0.75, keep_top_k=2, entropy_threshold=0.9, q=1.1),
                   dict(top_p=0.5, keep_top_k=1, entropy_threshold=0.95, q=1.0), per_token):
        got = dynamic_route_cpu(logits, eps=1e-5, **params)
        assert got is not None
        ref = dynamic_route_torch(logits, eps=1e-5, **params)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    # a strided view (a column slice of a wider logits matrix) reads the right elements
    wide = torch.randn(t, 3 * n, generator=g)
    got = dynamic_route_cpu(wide[:, n:2 * n], 0.75, 2, 0.9, 1.1, 1e-5)
    ref = dynamic_route_torch(wide[:, n:2 * n].contiguous())
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
