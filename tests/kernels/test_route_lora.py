"""``route_lora`` (one routed linear in one C++ call) adds, given the routing it reports, exactly the
routed LoRA of every site: every work split (whole banks per thread, or slot ranges then column
ranges), both vector widths (shapes multiples of 16: AVX-512 where compiled; of 8: AVX2) and every
weight dtype."""

import pytest
import torch

from kernels.routed_lora.cpu_ops import RouteLoraSites, RouteLoraStep, load_library

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ CPU kernel unavailable")

N, R = 6, 16


def _offsets(layout: str, t: int, banks: int, gen) -> torch.Tensor:
    if layout == "balanced":  # every bank the same rows: whole banks per thread
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
@pytest.mark.parametrize("layout", ["balanced", "one bank", "uneven", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_route_lora_adds_the_routed_lora_it_reports(dims, layout, dtype, threads):
    d_in, d_outs = dims
    gen = torch.Generator().manual_seed(d_in + len(layout))
    t, banks = 21, 4
    cap = banks * N
    x = torch.randn(t, d_in, generator=gen)
    routers = [torch.randn(cap, d_in, generator=gen) * 2 / d_in**0.5 for _ in d_outs]
    lora_a = [(torch.randn(cap, R, d_in, generator=gen) / d_in**0.5).to(dtype) for _ in d_outs]
    lora_b = [(torch.randn(cap, R, o, generator=gen) * 0.1).to(dtype) for o in d_outs]
    scale = torch.rand(cap, generator=gen) + 0.5
    cols = [0, d_outs[0]]
    sites = RouteLoraSites(routers, lora_a, lora_b, scale, cols)
    offsets = _offsets(layout, t, banks, gen)
    logits, w, ent = torch.zeros(2, t, N), torch.zeros(2, t, N), torch.zeros(2, t)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step = RouteLoraStep(offsets, N, top_p=0.75, keep_top_k=2.0, entropy_threshold=0.9, q=1.1, eps=1e-5,
                             outputs=(logits, w, ent))
    finally:
        torch.set_num_threads(prev)
    base = torch.randn(t, sum(d_outs), generator=gen)
    out = base.clone()
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
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
