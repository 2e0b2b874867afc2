"""``route_lora`` (one routed linear in one C++ call) adds, given the routing it reports, exactly the
routed LoRA of every site: every work split (whole banks per thread, or slot ranges then column
ranges; a prefill's banks dense), both vector widths (shapes multiples of 16: AVX-512 where compiled;
of 8: AVX2) and every weight dtype (int8 with per-row scales: the result is the dequantized weights';
"int8 packed", A and B in the kernel's packed order: within 2% rms of them, h being rounded to int8 per
pair for the VNNI expand)."""

import pytest
import torch

from kernels.routed_lora.cpu_ops import (
    RouteLoraSites,
    RouteLoraStep,
    load_library,
    pack_int8_a,
    pack_int8_b,
    packs_int8,
    unpack_int8_a,
    unpack_int8_b,
)

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ CPU kernel unavailable")

N, R = 6, 16


def _rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: (int8 values, [..] fp32 scales)."""
    scale = w.abs().amax(-1) / 127.0
    return torch.round(w / scale.clamp(min=1e-30).unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale.float()


def _offsets(layout: str, t: int, banks: int, gen) -> torch.Tensor:
    if layout in ("balanced", "long", "long broadcast", "few broadcast"):  # every bank the same rows: whole banks per thread
        off = torch.arange(t) % banks
    elif layout == "one bank":  # one bank: the column split
        off = torch.zeros(t, dtype=torch.int64)
    elif layout == "uneven":  # one bank holds most rows: the column split
        off = torch.where(torch.arange(t) < t - 3, 0, torch.arange(t) % banks)
    else:  # random banks, some rows outside the group
        off = torch.randint(0, banks, (t,), generator=gen)
    off = off * N
    if layout == "random":
        off[[1, 6]] = -1
    return off


@pytest.mark.parametrize("dims", [(64, (96, 48)), (40, (24, 56))])  # wide (x16), and x8 only
@pytest.mark.parametrize("layout", ["balanced", "one bank", "uneven", "random", "long", "long broadcast",
                                    "few broadcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, "int8 packed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_route_lora_adds_the_routed_lora_it_reports(dims, layout, dtype, threads):
    d_in, d_outs = dims
    packed = dtype == "int8 packed"
    if packed and not packs_int8():
        pytest.skip("this kernel build has no VNNI expand")
    gen = torch.Generator().manual_seed(d_in + len(layout))
    # "long": a prefill's many rows per bank (a bank whose rows select most of its experts runs dense:
    # all experts over all its rows, weight 0 where unselected); "long broadcast": every row selects
    # every expert (the entropy threshold 0), so the dense path surely runs; "few broadcast": a decode
    # step's two rows per bank, every expert selected (a packed pool's banks run dense, the others' segments)
    t, banks = (96, 2) if layout.startswith("long") else (8, 4) if layout.startswith("few") else (21, 4)
    cap = banks * N
    x = torch.randn(t, d_in, generator=gen)
    routers = [torch.randn(cap, d_in, generator=gen) * 2 / d_in**0.5 for _ in d_outs]
    lora_a = [torch.randn(cap, R, d_in, generator=gen) / d_in**0.5 for _ in d_outs]
    lora_b = [torch.randn(cap, R, o, generator=gen) * 0.1 for o in d_outs]
    scale = torch.rand(cap, generator=gen) + 0.5
    cols = [0, d_outs[0]]
    if dtype == torch.int8 or packed:
        (qa, sa), (qb, sb) = zip(*map(_rows_int8, lora_a)), zip(*map(_rows_int8, lora_b))
        # (shapes off the 16-column tiles cannot be packed: their bytes as they are, to see them refused)
        pack = packed and d_in % 16 == 0
        stored_a = [pack_int8_a(q) if pack else q for q in qa]
        stored_b = [pack_int8_b(q) if pack else q for q in qb]
        sites = RouteLoraSites(routers, stored_a, stored_b, scale, cols, a_scale=list(sa), b_scale=list(sb),
                               packed=packed)
        lora_a = [q.float() * sc.unsqueeze(-1) for q, sc in zip(qa, sa)]
        lora_b = [q.float() * sc.unsqueeze(-1) for q, sc in zip(qb, sb)]
    else:
        lora_a, lora_b = [t.to(dtype) for t in lora_a], [t.to(dtype) for t in lora_b]
        sites = RouteLoraSites(routers, lora_a, lora_b, scale, cols)
    assert sites.ok
    offsets = _offsets(layout, t, banks, gen)
    logits, w, ent = torch.zeros(2, t, N), torch.zeros(2, t, N), torch.zeros(2, t)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step = RouteLoraStep(offsets, N, top_p=0.75, keep_top_k=2.0,
                             entropy_threshold=0.0 if layout.endswith("broadcast") else 0.9, q=1.1, eps=1e-5,
                             outputs=(logits, w, ent))
    finally:
        torch.set_num_threads(prev)
    base = torch.randn(t, sum(d_outs), generator=gen)
    out = base.clone()
    if packed and d_in % 16:  # the packed expand takes 16-column tiles only: the caller's general path runs
        assert not step(x, sites, out) and torch.equal(out, base)
        return
    assert step(x, sites, out)
    expect = base.clone()
    for m, d_out in enumerate(d_outs):
        a, b = lora_a[m].float(), lora_b[m].float()
        for row in range(t):
            off = int(offsets[row])
            if off < 0:
                assert not w[m, row].any()
                continue
            for e in range(N):
                if w[m, row, e] != 0:
                    s = off + e
                    expect[row, cols[m]:cols[m] + d_out] += w[m, row, e] * scale[s] * (b[s].t() @ (a[s] @ x[row]))
    assert (w > 0).sum(-1).max() > 1  # rows use several experts
    if packed:
        got, want = out - base, expect - base
        # ~0.3% rms a segment; a dense unit rounds a row's n * r values of h on one scale (~1%)
        assert (got - want).norm() <= 0.02 * want.norm() and (got - want).abs().max() <= 0.04 * want.abs().max()
    else:
        torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_packed_int8_round_trips():
    """pack_int8_b's order: packed[c16][g][c][jj] = b[4 g + jj][16 c16 + c], pack_int8_a's
    packed[g][i16][jj][c] = a[4 g + jj][16 i16 + c], per slot; the unpacks invert them."""
    b = torch.randint(-127, 128, (3, 8, 32), dtype=torch.int8)
    p = pack_int8_b(b)
    assert p.shape == b.shape and torch.equal(unpack_int8_b(p), b)
    flat = p[1].reshape(-1)
    assert flat[0] == b[1, 0, 0] and flat[1] == b[1, 1, 0] and flat[4] == b[1, 0, 1]
    assert flat[64] == b[1, 4, 0] and flat[8 * 16] == b[1, 0, 16]
    a = torch.randint(-127, 128, (2, 8, 48), dtype=torch.int8)
    p = pack_int8_a(a)
    assert p.shape == a.shape and torch.equal(unpack_int8_a(p), a)
    flat = p[1].reshape(-1)
    assert flat[0] == a[1, 0, 0] and flat[15] == a[1, 0, 15] and flat[16] == a[1, 1, 0]
    assert flat[64] == a[1, 0, 16] and flat[4 * 48] == a[1, 4, 0]


def test_int8_sites_without_row_scales_are_refused():
    a, b = torch.zeros(6, R, 32, dtype=torch.int8), torch.zeros(6, R, 32, dtype=torch.int8)
    sites = RouteLoraSites([torch.zeros(6, 32)], [a], [b], torch.ones(6), [0])
    assert not sites.ok
    step = RouteLoraStep(torch.zeros(2, dtype=torch.int64), N, top_p=0.75, keep_top_k=2.0, entropy_threshold=0.9,
                         q=1.1, eps=1e-5)
    assert step.c_hook(sites) is None and not step(torch.zeros(2, 32), sites, torch.zeros(2, 32))
