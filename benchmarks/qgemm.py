"""Our CPU weight-only GEMM (kernels/quant_cpu.py) against torch's packed int4 / int8 kernels and
fp32 on oneDNN-packed weights, on SmolLM2-135M's shapes, then one decode step of the embedded
default with each. Systems alternate within each repeat, in one process.

Kernels (us per call, min over repeats): ``fp32`` (``--quantization none``'s GEMM), ``torch-i4`` /
``torch-i8`` (torch's kernels alone, on a bf16 input), ``torch-i4+cast`` / ``torch-i8+cast`` (what
``Int4Weight.linear`` / ``Int8Weight.linear`` ran before: casts to bf16 and back around the
kernel), ``ours-i4`` / ``ours-i8`` (``linear`` on our kernel, fp32 in and out).

Decode step (ms, median over rounds, after 64-token prompts): ``none`` (fp32), ``auto`` (the GGUF's
int4 blocks + int8 LM head on our kernel), ``auto-torch`` (the same on torch's kernels, i.e.
``MOLESERVE_CPU_KERNEL=0`` for the quantized weights).

    python benchmarks/qgemm.py [--threads 2] [--rows 1 8 32] [--repeats 5] [--batch 1 8 32] [--steps 16]
        [--rounds 3] [--no-step]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from kernels import quant_cpu  # noqa: E402
from server.model.layers import pack_linear_weight, packed_linear  # noqa: E402
from server.model.quantization import Int4Weight, Int8Weight  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # q|k|v, o, gate|up, down, LM head


def per_call_us(fn, budget_s: float = 0.05) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s and n >= 3:
            return dt / n * 1e6


def kernels_table(rows: list[int], repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    print("\n| shape [out, in] | M | " + " | ".join(SYSTEMS) + " | ours-i4 vs fp32 | ours-i8 vs fp32 | ours-i4 vs torch-i4+cast |")
    print("|---|---|" + "---|" * (len(SYSTEMS) + 3))
    for shape in SHAPES:
        w = torch.randn(*shape, generator=g) * 0.02
        fp32 = pack_linear_weight(w)
        torch4, torch8 = Int4Weight.quantize(w, compute_dtype=torch.bfloat16), Int8Weight.quantize(w, compute_dtype=torch.bfloat16)
        ours4, ours8 = Int4Weight.quantize(w), Int8Weight.quantize(w)
        assert ours4.cpu_kernel is not None and ours8.cpu_kernel is not None, "quant_cpu unavailable"
        for m in rows:
            x = torch.randn(m, shape[1], generator=g)
            xb = x.bfloat16()
            fns = {"fp32": lambda: packed_linear(x, fp32, None),
                   "torch-i4": lambda: torch4.kernel(xb), "torch-i8": lambda: torch8.kernel(xb),
                   "torch-i4+cast": lambda: torch4.linear(x), "torch-i8+cast": lambda: torch8.linear(x),
                   "ours-i4": lambda: ours4.linear(x), "ours-i8": lambda: ours8.linear(x)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    times[k].append(per_call_us(fn))
            best = {k: min(v) for k, v in times.items()}
            print(f"| {shape} | {m} | " + " | ".join(f"{best[k]:.0f}" for k in SYSTEMS)
                  + f" | {best['fp32'] / best['ours-i4']:.2f}x | {best['fp32'] / best['ours-i8']:.2f}x"
                  + f" | {best['torch-i4+cast'] / best['ours-i4']:.2f}x |", flush=True)


SYSTEMS = ("fp32", "torch-i4", "torch-i8", "torch-i4+cast", "torch-i8+cast", "ours-i4", "ours-i8")


def step_table(batches: list[int], steps: int, rounds: int) -> None:
    from step_profile import build, decode, start

    from server.model import ensure_default_model

    folder = ensure_default_model()
    engines = {v: build(v, folder, max(batches)) for v in ("none", "auto")}
    for v, engine in engines.items():  # warm up (loads every other C++ kernel before the next build)
        start(engine, 1, 2, f"w-{v}")
        decode(engine, 2)
    assert engines["auto"].model.lm_head_quant.cpu_kernel is not None
    os.environ["MOLESERVE_CPU_KERNEL"] = "0"  # only quant_cpu is loaded again: the others are cached
    quant_cpu.load_library.cache_clear()
    try:
        engines["auto-torch"] = build("auto", folder, max(batches))
    finally:
        del os.environ["MOLESERVE_CPU_KERNEL"]
        quant_cpu.load_library.cache_clear()
    assert engines["auto-torch"].model.lm_head_quant.cpu_kernel is None
    start(engines["auto-torch"], 1, 2, "w-auto-torch")
    decode(engines["auto-torch"], 2)
    wall: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for b in batches:
            for v, engine in engines.items():
                start(engine, b, steps, f"t{r}-{b}-{v}")
                wall.setdefault((v, b), []).append(decode(engine, steps))
    print(f"\ndecode step after 64-token prompts, {steps} steps per run, {rounds} alternating rounds: "
          "ms per step, median (min-max); tok/s = batch / median\n")
    print("| variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for v in engines:
        cells = []
        for b in batches:
            xs = sorted(wall[(v, b)])
            med = statistics.median(xs)
            cells.append(f"{med * 1e3:.1f} ({xs[0] * 1e3:.1f}-{xs[-1] * 1e3:.1f}), {b / med:.0f} tok/s")
        print(f"| {v} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-step", action="store_true", help="the kernels' table only")
    ap.add_argument("--no-kernels", action="store_true", help="the decode step's table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; kernels: us per call, min over {args.repeats} alternating repeats")
    if not args.no_kernels:
        kernels_table(args.rows, args.repeats)
    if not args.no_step:
        step_table(args.batch, args.steps, args.rounds)


if __name__ == "__main__":
    main()
