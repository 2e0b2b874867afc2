"""One decode step's routed LoRA on the CPU, kernel side: the 60 ``route_lora`` calls of a 32-token
step over 8 DynMoLE banks (6 experts, r=16, gate+up and down in each of SmolLM2-135M's 30 layers),
with the caches flushed first, as in the engine where the base model's weights stream through
between two layers. Each pool dtype has its own pool; the dtypes alternate, best of the repeats.

    python benchmarks/route_lora_step.py [--dtypes float32,float16,bfloat16,int8] [--repeats 7] [--x-scale 0.2]
        [--rows 32]

``int8``: the int8 pool of ``--bank-dtype int8`` (each row int8 with one fp32 scale), B in rows;
``int8-packed``: the same with A and B packed for the kernel (its VNNI expand), as the pool stores them where the kernel
build has that expand (``packs_int8``).

``--x-scale`` scales the random inputs against the random routers: 0.2 gives near-uniform routing
(~5.9 experts per decision, as the random banks of benchmarks/banks.py), 1 peaked (~2.1).
The pools run in turn each repeat (the order reversed every other repeat). Prints ms per step (best
of the repeats) and the median over the repeats of each pool's time over the first pool's (the figure
to read on a noisy machine), the expert bytes read per step and the rate (bytes / time), and beside them the
machine's read rate measured in the same run (one pass summing 256 MB, alternating with the pools)
and the time all the step's weight bytes (experts, routers, int8 row scales) take at that rate: the
floor of a step that reads each weight once from memory.  Bytes count what the step reads: the experts
some row selected (with their row scales) and the routers of the banks that have rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adapters.runtime.layout import int8_rows  # noqa: E402
from kernels.routed_lora.cpu_ops import (RouteLoraSites, RouteLoraStats, RouteLoraStep, load_library,  # noqa: E402
                                         pack_int8_a, pack_int8_b, packs_int8)
from server.engine.routing_stats import ENTROPY_BUCKETS  # noqa: E402

LAYERS, H, FFN, S, R, T, N = 30, 576, 1536, 48, 16, 32, 6


def pool(dtype: torch.dtype, seed: int = 0, packed: bool = False) -> list[tuple[RouteLoraSites, RouteLoraSites]]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(LAYERS):
        def site(i, o):
            a, b = torch.randn(S, R, i, generator=gen) / math.sqrt(i), torch.randn(S, R, o, generator=gen) * 0.01
            if dtype == torch.int8:
                (a, sa), (b, sb) = int8_rows(a), int8_rows(b)
                if packed:
                    a, b = pack_int8_a(a), pack_int8_b(b)
                return torch.randn(S, i, generator=gen) * 2 / math.sqrt(i), a, b, sa, sb
            return torch.randn(S, i, generator=gen) * 2 / math.sqrt(i), a.to(dtype), b.to(dtype), None, None
        g, u, d = site(H, FFN), site(H, FFN), site(FFN, H)
        scale = torch.full((S,), 2.0)
        rows = lambda *sites: ({"a_scale": [s[3] for s in sites], "b_scale": [s[4] for s in sites],  # noqa: E731
                                "packed": packed}
                               if dtype == torch.int8 else {})
        layers.append((RouteLoraSites([g[0], u[0]], [g[1], u[1]], [g[2], u[2]], scale, [0, FFN],
                                      [2 * layer, 2 * layer + 1], **rows(g, u)),
                       RouteLoraSites([d[0]], [d[1]], [d[2]], scale, [0], [2 * LAYERS + layer], **rows(d))))
    return layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--x-scale", type=float, default=0.2)
    ap.add_argument("--rows", type=int, default=T, help="rows of the step, over the 8 banks in turn (512: a "
                    "prefill chunk, 64 rows per bank, the banks dense)")
    args = ap.parse_args()
    if load_library() is None:
        sys.exit("the C++ kernel is unavailable")
    torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    if "int8-packed" in names and not packs_int8():
        sys.exit("int8-packed: this kernel build has no VNNI expand")
    pools = {name: pool(torch.int8, packed=True) if name == "int8-packed" else pool(getattr(torch, name))
             for name in names}
    gen = torch.Generator().manual_seed(1)
    t = args.rows
    xh, xi = torch.randn(t, H, generator=gen) * args.x_scale, torch.randn(t, FFN, generator=gen) * args.x_scale
    out_gu, out_d = torch.zeros(t, 2 * FFN), torch.zeros(t, H)
    stats = RouteLoraStats(3 * LAYERS, S, ENTROPY_BUCKETS)
    step = RouteLoraStep((torch.arange(t) % 8) * N, N, top_p=0.75, keep_top_k=2.0, entropy_threshold=0.9, q=1.1,
                         eps=1e-5, stats=stats)
    flush = torch.empty(64 << 20)  # 256 MB, 8x the L3
    best: dict[str, float] = {}
    runs: dict[str, list[float]] = {name: [] for name in pools}
    read = math.inf  # the machine's read rate, side by side: one pass summing the 256 MB
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        flush.sum()
        read = min(read, time.perf_counter() - t0)
        order = list(pools.items())
        for name, layers in (order if rep % 2 == 0 else order[::-1]):
            flush.add_(1)
            t0 = time.perf_counter()
            for gu, dn in layers:
                step(xh, gu, out_gu)
                step(xi, dn, out_d)
            runs[name].append(time.perf_counter() - t0)
            best[name] = min(best.get(name, math.inf), runs[name][-1])
    decisions = int(stats.acc[:, 0].sum())
    print(f"threads={args.threads}, rows {t}, x-scale {args.x_scale}: {stats.sel.sum().item() / decisions:.2f} experts "
          "per decision\n")
    rate = flush.numel() * 4 / read
    print(f"memory read rate (sum of 256 MB, {args.threads} threads): {rate / 1e9:.1f} GB/s\n")
    first = next(iter(pools))
    print(f"| pool dtype | ms per step (60 calls) | expert bytes per step | rate | all bytes (+ routers, scales) "
          f"| their read time at the measured rate | vs {first}, median of the repeats' ratios |\n"
          "|---|---|---|---|---|---|---|")
    # the experts the step reads: a slot of a site that some row selected (the same inputs every repeat,
    # so the same slots every step); with few rows (--rows 1) most slots are not read
    # (and their int8 row scales); the routers of the banks that have rows
    used = stats.sel > 0  # [site's stats row, slot]
    banks = min(t, 8)

    def read(sites, k: int, per_slot: bool) -> int:
        return sum((int(used[row].sum()) if per_slot else banks * N) * (w.numel() * w.element_size()) // S
                   for s in sites for row, w in zip(s.stat_rows, s.keep[k] or []))

    for name, layers in pools.items():
        sites = [s for gu, dn in layers for s in (gu, dn)]
        nbytes = read(sites, 1, True) + read(sites, 2, True)
        allb = nbytes + read(sites, 0, False) + read(sites, 4, True) + read(sites, 5, True)
        paired = statistics.median(a / b for a, b in zip(runs[name], runs[first]))
        print(f"| {name} | {best[name] * 1000:.1f} | {nbytes / 1e6:.0f} MB | {nbytes / best[name] / 1e9:.1f} GB/s "
              f"| {allb / 1e6:.0f} MB | {allb / rate * 1000:.1f} ms | {paired:.3f} |")


if __name__ == "__main__":
    main()
