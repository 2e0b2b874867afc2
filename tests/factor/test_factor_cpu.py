"""The one-call C++ factorised FFN (kernels/factor_cpu) equals factor_route + factor_ffn, and
factor_mlp takes it for a whole factor batch without changing the result."""

from __future__ import annotations

import pytest
import torch

from adapters.factor import factor_ffn, factor_route, pack_experts
from adapters.factor.serving import FactorLayer, factor_mlp
from kernels import plan_from_slots
from kernels.factor_cpu import factor_ffn_cpu, load_library

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ CPU kernel unavailable")


def _weights(gen, hidden, inter, experts, bias):
    gate_up, down = torch.randn(2 * inter, hidden, generator=gen), torch.randn(hidden, inter, generator=gen)
    perm = torch.randperm(inter, generator=gen)
    b = torch.randn(2 * inter, generator=gen) if bias else None
    return pack_experts(gate_up, down, perm, experts, b), perm


@pytest.mark.parametrize("tokens, hidden, experts, top_k, bias", [
    (1, 64, 4, 2, False), (8, 64, 8, 2, True), (33, 40, 8, 4, False), (5, 20, 4, 4, True), (3, 64, 6, 1, False)])
def test_factor_cpu_equals_torch(tokens, hidden, experts, top_k, bias):
    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    (w1, w2, pb), _ = _weights(gen, hidden, 48, experts, bias)
    x = torch.randn(tokens, hidden, generator=gen)
    router = torch.randn(experts, hidden, generator=gen)
    out, chosen = factor_ffn_cpu(x, router, w1, w2, top_k, 1.7, pb)
    slots, weights = factor_route(x, router, top_k, 1.7)
    want = factor_ffn(x, w1, w2, plan_from_slots(slots, weights), gate_up_bias=pb)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.sort(chosen, 1).values, torch.sort(slots, 1).values)


def test_factor_cpu_declines_what_it_cannot_do():
    gen = torch.Generator().manual_seed(0)
    (w1, w2, _), _ = _weights(gen, 16, 32, 4, False)
    router = torch.randn(4, 16, generator=gen)
    assert factor_ffn_cpu(torch.randn(3, 16, dtype=torch.float64), router, w1, w2, 2, 1.0) is None
    assert factor_ffn_cpu(torch.randn(16, 3).t(), router, w1, w2, 2, 1.0) is None
    x = torch.randn(3, 16, requires_grad=True)
    with torch.enable_grad():
        assert factor_ffn_cpu(x, router, w1.requires_grad_(), w2, 2, 1.0) is None


def test_factor_mlp_fast_path_equals_torch_path(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    hidden, inter, experts = 32, 64, 4
    (w1, w2, pb), perm = _weights(gen, hidden, inter, experts, True)
    layer = FactorLayer(router=torch.randn(experts, hidden, generator=gen), top_k=2, scale=1.3, w_gate_up=w1,
                        w_down=w2, gate_up_bias=pb, down_bias=torch.randn(hidden, generator=gen), gate_up_index=None,
                        inverse_permutation=torch.argsort(perm))
    x = torch.randn(6, hidden, generator=gen)
    with torch.inference_mode():
        fast = factor_mlp(x, None, layer)
        monkeypatch.setattr("adapters.factor.serving.factor_ffn_cpu", lambda *a, **k: None)
        slow = factor_mlp(x, None, layer)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)
