"""Every routed_lora backend against the torch reference (Triton under TRITON_INTERPRET=1)."""

import pytest
import torch

from kernels import plan_from_dense, plan_from_slots, routed_lora, routed_lora_torch
from kernels.routed_lora import cpu_ops

BACKENDS = ["cpu", "triton"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # relative (Frobenius) error


def make_case(t, k, s, r, d_in, d_out, dtype=torch.float32, slot_mode="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(dtype)
    a = (torch.randn(s, r, d_in, generator=g) / d_in**0.5).to(dtype)
    b = (torch.randn(s, d_out, r, generator=g) / r**0.5).to(dtype)
    if slot_mode == "random":
        slots = torch.randint(0, s, (t, k), generator=g)
    elif slot_mode == "sparse":  # many -1 slots
        slots = torch.randint(0, s, (t, k), generator=g)
        slots[torch.rand(t, k, generator=g) < 0.6] = -1
    elif slot_mode == "one_slot":  # every token on one slot
        slots = torch.full((t, k), s - 1)
    elif slot_mode == "own_slot":  # every token on its own slot
        slots = torch.arange(t).remainder(s).unsqueeze(-1).expand(t, k).clone()
        slots[:, 1:] = -1
    weights = torch.rand(t, k, generator=g)
    scaling = torch.rand(s, generator=g) + 0.5
    return x, a, b, slots, weights, scaling


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


CASES = [  # (T, K, S, r, d_in, d_out, slot_mode)
    (1, 1, 4, 4, 16, 24, "random"),
    (1, 3, 6, 8, 40, 24, "random"),
    (7, 2, 5, 16, 33, 70, "random"),
    (19, 6, 12, 8, 48, 20, "sparse"),
    (17, 3, 6, 64, 32, 48, "random"),
    (13, 2, 4, 4, 24, 16, "one_slot"),
    (9, 2, 16, 16, 20, 36, "own_slot"),
    (70, 4, 9, 16, 24, 40, "random"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp32_matches_reference(backend, case):
    *shape, mode = case
    x, a, b, slots, w, sc = make_case(*shape, slot_mode=mode)
    ref = routed_lora_torch(x, a, b, slots, w, sc)
    out = routed_lora(x, a, b, slots, w, sc, backend=backend)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    # unused slots contribute nothing: a token with only -1 slots gets exactly zero
    empty = (slots < 0).all(-1)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(backend, dtype):
    x, a, b, slots, w, sc = make_case(11, 3, 6, 16, 40, 56, dtype=dtype, slot_mode="sparse")
    ref = routed_lora_torch(x.float(), a.float(), b.float(), slots, w, sc)
    out = routed_lora(x, a, b, slots, w, sc, backend=backend)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_scalar_scaling_plan_reuse_and_b_layouts(backend):
    x, a, b, slots, w, _ = make_case(10, 3, 8, 8, 24, 32)
    ref = routed_lora_torch(x, a, b, slots, w, 2.0)
    plan = plan_from_slots(slots, w)
    b_rt = b.transpose(1, 2).contiguous().transpose(1, 2)  # [S, d_out, r] view of [S, r, d_out]
    for bb in (b, b_rt):
        out = routed_lora(x, a, bb, slots, w, 2.0, backend=backend, plan=plan)
        assert rel_err(out, ref) < 1e-4


def test_cpu_segment_loop_fallback_and_fp16_weights():
    x, a, b, slots, w, sc = make_case(12, 2, 6, 8, 20, 28)
    ref = routed_lora_torch(x, a, b, slots, w, sc)
    assert rel_err(cpu_ops.segment_loop(x, a, b, plan_from_slots(slots, w), sc), ref) < 1e-4
    # fp16 weights in the C++ kernel's scalar path (d_in 20: not the AVX2 shapes): exact on the rounded weights
    ah, bh = a.half(), b.half()
    out = routed_lora(x, ah, bh, slots, w, sc, backend="cpu")
    assert rel_err(out, routed_lora_torch(x, ah.float(), bh.float(), slots, w, sc)) < 1e-5
    assert rel_err(out, ref) < 3e-3


def test_auto_on_cpu_and_dense_routing_plan():
    x, a, b, _, _, sc = make_case(6, 1, 12, 4, 16, 16)
    dense = torch.softmax(torch.randn(6, 6), -1) * (torch.rand(6, 6) > 0.5)
    plan = plan_from_dense(dense, torch.tensor([0, 6, 6, -1, 0, 6]))
    ref = routed_lora_torch(x, a, b, plan.slots, plan.weights, sc)
    out = routed_lora(x, a, b, plan.slots, plan.weights, sc, plan=plan)
    assert rel_err(out, ref) < 1e-4


def test_unknown_backend():
    x, a, b, slots, w, sc = make_case(2, 1, 2, 4, 8, 8)
    with pytest.raises(ValueError):
        routed_lora(x, a, b, slots, w, sc, backend="cuda")


POOL_CASES = [  # (T, K, S, r, d_in, d_out, slot_mode): the pool's B layout [S, r, d_out], 8-aligned sizes
    (32, 6, 48, 16, 576, 1536, "sparse"),  # decode step of 8 banks x 6 experts on SmolLM2's gate/up
    (5, 3, 7, 5, 64, 200, "random"),  # odd rank; a last column block of 8 of 64 columns
    (9, 2, 4, 1, 16, 8, "random"),  # rank 1; one 8-wide block
    (40, 2, 3, 16, 24, 72, "one_slot"),  # one long segment
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_pool_layout_matches_reference(case, dtype):
    """The CPU kernel's vectorised path (B as the pool stores it, [S, r, d_out], seen transposed)."""
    *shape, mode = case
    x, a, b, slots, w, sc = make_case(*shape, slot_mode=mode)
    a, b = a.to(dtype), b.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    ref = routed_lora_torch(x, a.float(), b.float(), slots, w, sc)
    out = routed_lora(x, a, b, slots, w, sc, backend="cpu")
    assert rel_err(out, ref) < 1e-5
    empty = (slots < 0).all(-1)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("case", CASES[:5] + CASES[7:], ids=lambda c: "-".join(map(str, c)))
def test_static_plan_matches_reference_on_triton(case):
    """The GPU path's plan (static sizes, built without a host sync: every pool slot a segment, invalid
    pairs sorted last) gives the reference's output through the Triton kernels."""
    *shape, mode = case
    x, a, b, slots, w, sc = make_case(*shape, slot_mode=mode)
    plan = plan_from_slots(slots, w, num_slots=a.shape[0])
    assert plan.num_segments == a.shape[0] and plan.max_seg_len == slots.shape[0]
    assert int(plan.seg_len.sum()) == int((slots >= 0).sum())
    ref = routed_lora_torch(x, a, b, slots, w, sc)
    out = routed_lora(x, a, b, slots, w, sc, backend="triton", plan=plan)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("case", [(9, 2, 6, 16, 64, 96, "random"), (5, 3, 4, 8, 32, 48, "sparse"),
                                  (12, 2, 3, 16, 48, 32, "one_slot")])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_int8_rows_as_stored_match_their_dequantized_weights(case, threads, packed):
    """An int8 pool's site (values and row scales, B [S, r, d_out] as the pool stores it) gives the
    dequantized weights' routed delta; shapes the kernel does not take give None (the caller then
    dequantizes). Packed for the kernel (where the build has its VNNI expand): within 1% (h is rounded to
    int8 per pair)."""
    if packed and not cpu_ops.packs_int8():
        pytest.skip("this kernel build has no VNNI expand")
    t, k, s, r, d_in, d_out, mode = case
    x, a, b, slots, weights, scaling = make_case(t, k, s, r, d_in, d_out, slot_mode=mode)
    b = b.transpose(1, 2).contiguous()  # [S, r, d_out]

    def rows(w):
        sc = w.abs().amax(-1).clamp_min(1e-30) / 127
        return torch.round(w / sc.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), sc.float()

    (qa, sa), (qb, sb) = rows(a), rows(b)
    deq_a, deq_b = qa.float() * sa.unsqueeze(-1), qb.float() * sb.unsqueeze(-1)
    ref = routed_lora_torch(x, deq_a, deq_b.transpose(1, 2), slots, weights, scaling)
    plan = plan_from_slots(slots, weights)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_ops.routed_lora_int8_cpu(x, cpu_ops.pack_int8_a(qa) if packed else qa, sa,
                                           cpu_ops.pack_int8_b(qb) if packed else qb, sb, plan, scaling, packed)
    finally:
        torch.set_num_threads(prev)
    if cpu_ops.load_library() is None or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("no AVX-512 build of the kernel here")
    assert out is not None
    assert rel_err(out, ref) < (1e-2 if packed else 1e-5)
    if packed:
        assert rel_err(out, ref) > 1e-6  # the packed expand ran: its rounding of h shows
    assert cpu_ops.routed_lora_int8_cpu(x[:, :-8].contiguous(), qa[:, :, :-8].contiguous(), sa, qb, sb, plan,
                                        scaling) is None  # d_in not a multiple of 16
