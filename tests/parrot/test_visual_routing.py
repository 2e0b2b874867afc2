"""``--visual-routing`` on the mixture, against a reference written here from ALGORITHMS.md §5 (the
route: attention of the projected CLS over the prompt's word embeddings, the gate, a softmax) and
§2 (DynMoLE's hybrid rule): ``dense`` is the release (every expert), ``topk:K`` keeps the K best
renormalised, ``dynmole`` keeps the top-p set (at least keep_top_k) or broadcasts when the routing
vector's normalised Tsallis entropy is over the threshold, weights not renormalised. Only the experts
with a non-zero weight run."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.parrot import ParrotConfig, VisualMixture, VisualRouting

D, E, INTER, N, NT = 16, 6, 24, 5, 7


@torch.no_grad()
def reference_weights(mix: VisualMixture, visual, text, routing: VisualRouting) -> torch.Tensor:
    q = visual[0]
    a = torch.softmax(text @ q / math.sqrt(D), dim=0)
    p = torch.softmax(mix.gate.weight @ (a @ text), dim=0).double()
    if routing.mode == "dense":
        return p
    order = torch.argsort(p, descending=True)
    if routing.mode == "topk":
        w = torch.zeros_like(p)
        w[order[:routing.k]] = p[order[:routing.k]] / p[order[:routing.k]].sum()
        return w
    qq, eps = routing.q, 1e-5
    h = (1 - ((p + eps) ** qq).sum()) / (qq - 1) / ((1 - E ** (1 - qq)) / (qq - 1))
    keep = torch.zeros(E, dtype=torch.bool)
    if h > routing.entropy_threshold:
        keep[:] = True
    else:
        csum = 0.0
        for rank, e in enumerate(order.tolist()):
            csum += float(p[e])
            if csum <= routing.top_p or rank < routing.keep_top_k:
                keep[e] = True
    return p * keep


@pytest.mark.parametrize("spec, gate_scale", [("dense", 1.0), ("topk:2", 1.0), ("topk:1", 30.0),
                                              ("dynmole", 0.01), ("dynmole", 1.0), ("dynmole", 30.0)])
def test_routing_modes_equal_the_reference_and_run_only_chosen_experts(spec, gate_scale):
    torch.manual_seed(0)
    mix = VisualMixture(ParrotConfig(hidden_size=D, mm_hidden_size=D, num_experts=E, moe_intermediate_size=INTER,
                                     moe_weight=0.1, use_moe=True)).double()
    with torch.no_grad():
        mix.gate.weight.mul_(gate_scale)
    visual, text = torch.randn(N, D, dtype=torch.float64), torch.randn(NT, D, dtype=torch.float64)
    routing = VisualRouting.parse(spec)
    w = reference_weights(mix, visual, text, routing)
    ran = []
    hooks = [ex.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, ex in enumerate(mix.experts)]
    with torch.no_grad():
        route = mix.route(visual, text, routing)
        out = mix.combine([visual], [route])[0]
    for h in hooks:
        h.remove()
    torch.testing.assert_close(route.weights.double(), w, atol=1e-6, rtol=1e-5)
    chosen = torch.nonzero(w).flatten().tolist()
    assert sorted(ran) == chosen
    want = 0.1 * visual + sum(w[e] * mix.experts[e](visual) for e in chosen)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    if spec == "dense" or (spec == "dynmole" and gate_scale == 0.01):  # every expert (broadcast when flat)
        assert len(chosen) == E
    if spec == "dynmole" and gate_scale == 30.0:  # peaked: the sparse branch, at least keep_top_k
        assert 2 <= len(chosen) < E and float(w.sum()) < 1
