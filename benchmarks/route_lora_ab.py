"""Two builds of the ``route_lora`` CPU kernel side by side in one process: the decode step of
benchmarks/route_lora_step.py (60 calls over 8 DynMoLE banks, caches flushed first) run by build A
and build B in turn, on the same pools, inputs and routing, the order swapped every round. Each
build is the kernel source at a git revision (or a file), compiled as the server compiles it.

    python benchmarks/route_lora_ab.py [--a HEAD~1] [--b HEAD] [--dtypes int8,float16] [--rounds 25]
        [--rows 32]

Prints, per pool dtype, each build's median and best ms per step and the median of the per-round
ratios B / A (each round runs both builds back to back, so a host that slows for a while slows both):
on a noisy machine that ratio is the figure to read, not the two medians. Both builds must produce
the same outputs (checked once, to 1e-4 of the largest output: builds may round differently; with
``--tol``, to that fraction of the outputs' norm, for builds that round their operands differently,
as the VNNI expand's rounding of h differs between a segment and a dense unit).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import route_lora_step as rls  # noqa: E402
from kernels.cpp_build import load_cpp_library  # noqa: E402
from kernels.routed_lora.cpu_ops import RouteLoraStats, RouteLoraStep  # noqa: E402
from server.engine.routing_stats import ENTROPY_BUCKETS  # noqa: E402

SOURCE = "kernels/routed_lora/cpu_kernel.cpp"


def kernel_source(rev: str, folder: Path) -> Path:
    """The kernel source at git revision ``rev`` (or the file ``rev``), written to ``folder``."""
    path = Path(rev)
    text = path.read_text() if path.is_file() else subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    src = folder / "cpu_kernel.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(text)
    return src


def build(rev: str, folder: Path) -> ctypes.CDLL:
    """The kernel at git revision ``rev`` (or the file ``rev``), compiled and loaded."""
    lib = load_cpp_library(kernel_source(rev, folder), f"route_lora at {rev}")
    if lib is None:
        sys.exit(f"the kernel at {rev} does not build")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.route_lora.argtypes = [p, p, i64, p, p]
    lib.route_lora.restype = ctypes.c_int
    lib.route_lora_check.argtypes = [p, p]
    lib.route_lora_check.restype = ctypes.c_int
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="HEAD~1", help="git revision (or file) of build A")
    ap.add_argument("--b", default="HEAD", help="git revision (or file) of build B")
    ap.add_argument("--dtypes", default="int8,float16", help="pool dtypes; int8-packed: int8 packed for the "
                    "kernel's VNNI expand (the builds must both read it)")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=rls.T)
    ap.add_argument("--x-scale", type=float, default=0.2)
    ap.add_argument("--tol", type=float, default=None, help="outputs agree to this fraction of their norm "
                    "(rms); default: to 1e-4 of the largest output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(args.a, Path(tmp) / "a"), build(args.b, Path(tmp) / "b")]
    pools = {name: rls.pool(torch.int8, packed=True) if name == "int8-packed" else rls.pool(getattr(torch, name))
             for name in args.dtypes.split(",")}
    gen = torch.Generator().manual_seed(1)
    t = args.rows
    xh = torch.randn(t, rls.H, generator=gen) * args.x_scale
    xi = torch.randn(t, rls.FFN, generator=gen) * args.x_scale
    steps = []
    for lib in libs:
        stats = RouteLoraStats(3 * rls.LAYERS, rls.S, ENTROPY_BUCKETS)
        step = RouteLoraStep((torch.arange(t) % 8) * rls.N, rls.N, top_p=0.75, keep_top_k=2.0, entropy_threshold=0.9,
                             q=1.1, eps=1e-5, stats=stats)
        step.lib = lib
        steps.append(step)

    def run(k: int, layers) -> tuple[torch.Tensor, torch.Tensor]:
        og, od = torch.zeros(t, 2 * rls.FFN), torch.zeros(t, rls.H)
        for gu, dn in layers:
            if not (steps[k](xh, gu, og) and steps[k](xi, dn, od)):
                sys.exit("route_lora declined the step")
        return og, od

    for name, layers in pools.items():  # same outputs (the sums' order may differ between builds)
        for a, b in zip(run(0, layers), run(1, layers)):
            rel = ((a - b).norm() / a.norm()).item()
            if (not torch.allclose(a, b, rtol=0, atol=1e-4 * a.abs().max().item()) if args.tol is None
                    else rel > args.tol):
                sys.exit(f"{name}: builds A and B disagree (max diff {(a - b).abs().max().item():.3g}, rms {rel:.3g})")
            if args.tol is not None:
                print(f"{name}: B - A, rms over A's outputs: {rel:.2e}")
    flush = torch.empty(64 << 20)  # 256 MB, past the L3
    og, od = torch.zeros(t, 2 * rls.FFN), torch.zeros(t, rls.H)
    times = {(name, k): [] for name in pools for k in (0, 1)}
    for r in range(args.rounds):
        for name, layers in pools.items():
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                flush.add_(1)
                t0 = time.perf_counter()
                for gu, dn in layers:
                    steps[k](xh, gu, og)
                    steps[k](xi, dn, od)
                times[(name, k)].append(time.perf_counter() - t0)
    print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds, {t} rows, {args.threads} threads\n")
    print("| pool dtype | A median (best) ms | B median (best) ms | B / A, median of the rounds |\n|---|---|---|---|")
    for name in pools:
        a, b = times[(name, 0)], times[(name, 1)]
        ratio = statistics.median(y / x for x, y in zip(a, b))
        print(f"| {name} | {statistics.median(a) * 1e3:.1f} ({min(a) * 1e3:.1f}) | "
              f"{statistics.median(b) * 1e3:.1f} ({min(b) * 1e3:.1f}) | {ratio:.3f} |")


if __name__ == "__main__":
    main()
