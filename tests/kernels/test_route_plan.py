"""The one-call C++ routing + plans (``route_plan_cpu``) equals the router GEMM, the torch DynMoLE
routing and the torch plans it replaces."""

import pytest
import torch

from kernels import plan_from_slots, slots_from_dense
from kernels.routed_lora.cpu_ops import load_library, route_plan_cpu
from kernels.routing import dynamic_route_torch

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ CPU kernel unavailable")


def _reference(x, router, offsets, n, **prm):
    """logits [T, n] of each row's own bank (-1: zero), the torch routing and the torch plan."""
    full = x @ router.t()
    idx = offsets.clamp(min=0).unsqueeze(1) + torch.arange(n)
    logits = full.gather(1, idx)
    eps = prm.pop("eps")
    w, ent = dynamic_route_torch(logits, eps=eps, **prm)
    off = offsets < 0
    logits[off], w[off], ent[off] = 0.0, 0.0, 0.0
    return logits, w, ent, plan_from_slots(*slots_from_dense(w, offsets))


@pytest.mark.parametrize("d_in", [576, 20])  # AVX2 dot (16 at a time, tail) and the scalar tail only
@pytest.mark.parametrize("per_token", [False, True])
def test_route_plan_equals_torch(d_in, per_token):
    gen = torch.Generator().manual_seed(d_in + per_token)
    t, n, cap, m = 29, 6, 48, 2
    x = torch.randn(t, d_in, generator=gen)
    x[4] = 0.0  # uniform row: ties, broadcast
    routers = tuple(torch.randn(cap, d_in, generator=gen) * 2 / d_in**0.5 for _ in range(m))
    offsets = torch.randint(0, cap // n, (t,), generator=gen) * n
    offsets[[2, 11]] = -1  # rows not routed at this site
    prm = dict(top_p=0.75, keep_top_k=2.0, entropy_threshold=0.9, q=1.1, eps=1e-5)
    if per_token:
        prm.update(top_p=torch.rand(t, generator=gen), keep_top_k=torch.randint(1, 3, (t,), generator=gen).float(),
                   entropy_threshold=torch.rand(t, generator=gen) * 0.5 + 0.5, q=torch.rand(t, generator=gen) + 0.5)
    logits, w, ent, plans = route_plan_cpu(x, routers, offsets, n, **prm)
    assert logits.shape == w.shape == (m, t, n) and ent.shape == (m, t) and len(plans) == m
    for i in range(m):
        rl, rw, re, rp = _reference(x, routers[i], offsets, n, **dict(prm))
        torch.testing.assert_close(logits[i], rl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w[i], rw, rtol=1e-5, atol=1e-6)
        # H_q = (1 - sum p^q) / (1 - N^(1-q)) divides two small numbers when q is near 1 (a per-token q of
        # 0.994 here): fp32 rounding is amplified ~1/|1-q| there, so the entropy gets a looser bound
        torch.testing.assert_close(ent[i], re, rtol=1e-4, atol=5e-5)
        for f in ("pair_token", "pair_slot", "seg_slot", "seg_start", "seg_len"):
            assert torch.equal(getattr(plans[i], f), getattr(rp, f)), f
        torch.testing.assert_close(plans[i].pair_weight, rp.pair_weight, rtol=1e-5, atol=1e-6)
        assert plans[i].max_seg_len == rp.max_seg_len
        assert (plans[i].slots[offsets < 0] == -1).all()


def test_route_plan_refuses_slots_past_the_pool():
    x, router = torch.randn(3, 8), torch.randn(12, 8)
    with pytest.raises(RuntimeError, match="code 2"):
        route_plan_cpu(x, (router,), torch.tensor([0, 6, 8]), 6, top_p=0.75, keep_top_k=2, entropy_threshold=0.9,
                       q=1.1, eps=1e-5)


def test_route_plan_declines_what_it_cannot_do():
    x = torch.randn(3, 8)
    kw = dict(top_p=0.75, keep_top_k=2, entropy_threshold=0.9, q=1.1, eps=1e-5)
    assert route_plan_cpu(x, (torch.randn(12, 8).t().contiguous().t(),), torch.zeros(3, dtype=torch.long), 6, **kw) is None
    assert route_plan_cpu(x, (torch.randn(12, 8, dtype=torch.float64),), torch.zeros(3, dtype=torch.long), 6, **kw) is None
    assert route_plan_cpu(x, (torch.randn(130, 8),), torch.zeros(3, dtype=torch.long), 65, **kw) is None
