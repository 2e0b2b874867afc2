"""Time per call of routed_lora's backends and of the routing step; prints the BENCHMARKS.md table.

    python benchmarks/kernels.py [--threads 2] [--quick]

Workload: 8 DynMoLE banks of 6 experts (S = 48 slots, r = 16), tokens spread evenly over the banks,
each token on K distinct experts of its own bank.  Baselines: the naive per-expert Python loop and the
dense DynMoLE-release approach (every expert of the bank on every token of the bank, times a weight
that is often zero).  Times are the best of several repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# This file is itself named kernels.py: drop its folder from sys.path so `kernels` is the package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(_HERE)]
sys.path.insert(0, str(Path(_HERE).parent))

import torch  # noqa: E402

from kernels import dynamic_route, plan_from_dense, plan_from_slots, routed_lora  # noqa: E402
from kernels.routed_lora import cpu_ops  # noqa: E402

BANKS, EXPERTS, RANK = 8, 6, 16
SIZES = {"135M": (576, 1536), "8B": (4096, 14336)}


def best_us(fn, min_time=0.2, repeats=5) -> float:
    fn()
    n = max(1, int(0.02 / max(_once(fn), 1e-6)))
    best = float("inf")
    deadline = time.perf_counter() + min_time * repeats
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        if time.perf_counter() > deadline:
            break
    return best


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_workload(t, k, d_in, d_out, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = BANKS * EXPERTS
    x = torch.randn(t, d_in, generator=g)
    a = torch.randn(s, RANK, d_in, generator=g) / d_in**0.5
    b = torch.randn(s, d_out, RANK, generator=g) / RANK**0.5
    bank = torch.arange(t) % BANKS
    experts = torch.rand(t, EXPERTS, generator=g).argsort(-1)[:, :k]
    slots = bank.unsqueeze(-1) * EXPERTS + experts
    weights = torch.rand(t, k, generator=g)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), a.to(dtype=dtype, **to), b.to(dtype=dtype, **to), slots.to(**to),
            weights.to(**to), bank.to(**to))


def naive_loop(x, a, b, slots, weights, scaling):
    """Per-expert Python loop over every slot of the pool."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for s in range(a.shape[0]):
        tok, kk = (slots == s).nonzero(as_tuple=True)
        if tok.numel():
            y = (x[tok].float() @ a[s].float().t()) @ b[s].float().t()
            out.index_add_(0, tok, y * (weights[tok, kk] * scaling).unsqueeze(-1))
    return out.to(x.dtype)


def dense_release(x, a, b, slots, weights, scaling, bank):
    """DynMoLE release style: every expert of a token's bank computed, multiplied by a dense weight."""
    dense = torch.zeros(x.shape[0], a.shape[0])
    dense.scatter_(1, slots, weights)
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for bk in range(BANKS):
        tok = (bank == bk).nonzero(as_tuple=True)[0]
        xb = x[tok].float()
        acc = torch.zeros(tok.numel(), b.shape[1])
        for e in range(EXPERTS):
            s = bk * EXPERTS + e
            acc += (xb @ a[s].float().t()) @ b[s].float().t() * (dense[tok, s] * scaling).unsqueeze(-1)
        out[tok] = acc
    return out.to(x.dtype)


def run(threads: int, quick: bool) -> str:
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    lib = cpu_ops.load_library()
    shapes = [(32, k) for k in ((2, 6) if quick else (2, 4, 6))] + [(2048, 3)]
    rows = []
    header = ["model", "linear (d_in->d_out)", "T", "K", "pairs", "torch ref", "naive loop",
              "dense (release)", "cpu: C++ kernel", "cpu: C++ bf16 W", "cpu: segment loop",
              "cpu (auto pick)", "route+plan", "triton"]
    for model, (hid, inter) in SIZES.items():
        for d_in, d_out in ((hid, inter), (inter, hid)):
            for t, k in shapes:
                if quick and model == "8B" and t > 32:
                    continue
                x, a, b, slots, w, bank = make_workload(t, k, d_in, d_out)
                plan = plan_from_slots(slots, w)
                sc = 2.0
                big = t * d_out * RANK * k > 3e7
                r = {
                    "torch ref": None if big else best_us(lambda: routed_lora(x, a, b, slots, w, sc, backend="torch")),
                    "naive loop": best_us(lambda: naive_loop(x, a, b, slots, w, sc)),
                    "dense (release)": best_us(lambda: dense_release(x, a, b, slots, w, sc, bank)),
                    "cpu: C++ kernel": best_us(lambda: cpu_ops._call_kernel(lib, x, a, b, plan, sc)) if lib else None,
                    "cpu: C++ bf16 W": None,
                    "cpu: segment loop": best_us(lambda: cpu_ops.segment_loop(x, a, b, plan, sc)),
                    "cpu (auto pick)": best_us(lambda: routed_lora(x, a, b, slots, w, sc, plan=plan)),
                }
                if lib:
                    ab, bb = a.bfloat16(), b.bfloat16()
                    r["cpu: C++ bf16 W"] = best_us(lambda: cpu_ops._call_kernel(lib, x, ab, bb, plan, sc))
                logits = torch.randn(t, EXPERTS)
                offset = bank * EXPERTS

                def route_and_plan():
                    wd, _ = dynamic_route(logits)
                    return plan_from_dense(wd, offset)

                r["route+plan"] = best_us(route_and_plan)
                if cuda:
                    r["triton"] = _triton_row(t, k, d_in, d_out)
                else:
                    r["triton"] = "n/a (no CUDA)"
                cells = [model, f"{d_in}->{d_out}", t, k, plan.num_pairs] + [r[h] for h in header[5:]]
                rows.append(cells)
                print("  ", " | ".join(_fmt(c) for c in cells), flush=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _triton_row(t, k, d_in, d_out) -> str:
    """us/call and achieved bandwidth vs. the card's measured copy bandwidth (bf16)."""
    x, a, b, slots, w, _ = make_workload(t, k, d_in, d_out, device="cuda", dtype=torch.bfloat16)
    plan = plan_from_slots(slots, w)
    us = best_us(lambda: routed_lora(x, a, b, slots, w, 2.0, backend="triton", plan=plan))
    used = plan.num_segments
    nbytes = 2 * (used * RANK * (d_in + d_out) + t * (d_in + d_out))
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_us = best_us(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() / copy_us
    return f"{us:.0f} us, {nbytes / us / copy_bw:.0%} of copy BW"


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:,.0f}"
    return str(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (decode K=2,6; no 8B prefill)")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, CUDA: {torch.cuda.is_available()}")
    print("# us per call (best of repeats); route+plan = dynamic_route + plan_from_dense")
    print(run(args.threads, args.quick))


if __name__ == "__main__":
    main()
