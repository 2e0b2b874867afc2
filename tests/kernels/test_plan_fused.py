"""The one-call C++ plan builder equals the torch plan (kernels.pairs) exactly."""

import pytest
import torch

from kernels import dynamic_route, plan_from_slots, slots_from_dense
from kernels.routed_lora.cpu_ops import build_plan_cpu, load_library

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ CPU kernel unavailable")


def _same_pairs(a, b):
    for f in ("pair_token", "pair_slot", "pair_weight", "seg_slot", "seg_start", "seg_len"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.max_seg_len == b.max_seg_len


@pytest.mark.parametrize("seed", range(5))
def test_dense_plan_equals_torch(seed):
    gen = torch.Generator().manual_seed(seed)
    t, n, cap = 37, 6, 64
    logits = torch.randn(t, n, generator=gen) * 3
    logits[::5] = 0.0  # ties: uniform rows (broadcast)
    w, _ = dynamic_route(logits)
    w[3] = 0.0  # a token with no pairs
    offsets = torch.randint(0, cap - n, (t,), generator=gen)
    offsets[7] = -1  # a token without a bank
    ref = plan_from_slots(*slots_from_dense(w, offsets))
    got = build_plan_cpu(w, offsets, cap)
    _same_pairs(got, ref)
    assert got.slots.shape == (t, n)
    k = ref.slots.shape[1]
    # each token's pairs in decreasing weight, -1 / 0 padded beyond the reference's K
    assert torch.equal(got.weights[:, :k], ref.weights) and (got.weights[:, k:] == 0).all()
    assert (got.slots[:, k:] == -1).all()
    assert torch.equal(torch.sort(got.slots[:, :k], dim=1).values, torch.sort(ref.slots, dim=1).values)


def test_dense_plan_reads_strided_rows():
    w = torch.rand(10, 12)
    w[w < 0.5] = 0
    offsets = torch.arange(10) * 6
    _same_pairs(build_plan_cpu(w[:, :6], offsets, 64), plan_from_slots(*slots_from_dense(w[:, :6], offsets)))


def test_slots_plan_equals_torch():
    gen = torch.Generator().manual_seed(0)
    slots = torch.randint(-1, 20, (25, 4), generator=gen)
    weights = torch.rand(25, 4, generator=gen)
    weights[0, 0] = 0.0  # zero-weight pairs are kept
    got, ref = build_plan_cpu(weights, None, 20, slots=slots), plan_from_slots(slots, weights)
    _same_pairs(got, ref)
    assert torch.equal(got.slots, ref.slots) and torch.equal(got.weights, ref.weights)


def test_empty_and_out_of_range():
    plan = build_plan_cpu(torch.zeros(3, 6), torch.zeros(3, dtype=torch.long), 8)
    assert plan.num_pairs == 0 and plan.num_segments == 0 and plan.max_seg_len == 0
    with pytest.raises(RuntimeError):
        build_plan_cpu(torch.ones(2, 6), torch.tensor([0, 4]), 8)
