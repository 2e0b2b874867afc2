"""Two builds of the ``route_lora`` CPU kernel side by side in one serving engine: the engine
``moleserve serve --banks`` builds (its defaults: the int4 base, the int8 bank pool), 8 random
DynMoLE banks (benchmarks/banks.py), 32 requests of 16-token prompts over the 8 banks, greedy; each
round runs the base alone, then build A and build B (the order swapped every round). What a kernel
change is worth in a whole decode run (prefill, Python, the base's weights), where
benchmarks/route_lora_ab.py times the kernel alone.

    python benchmarks/route_lora_engine_ab.py [--a HEAD~1] [--b HEAD] [--rounds 10] [--new-tokens 32]

A build is the kernel source at a git revision (or a file), compiled as the server compiles it. The
engine's bank steps call ``kernels.routed_lora.cpu_ops.load_library`` when they build their routed
groups: the benchmark points it at the round's build and drops the groups the pool state keeps across
steps. Prints each system's median tok/s, B's time over A's (median of the rounds: the figure to read
on a noisy machine) and each build's banks-over-base time ratio (median of the rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels.routed_lora import cpu_ops  # noqa: E402
from route_lora_ab import kernel_source  # noqa: E402


def build(rev: str, folder: Path):
    """The kernel at git revision ``rev`` (or the file ``rev``), loaded as ``load_library`` loads it."""
    src = kernel_source(rev, folder)
    keep = cpu_ops._SOURCE
    try:
        cpu_ops._SOURCE = src
        cpu_ops.load_library.cache_clear()
        lib = cpu_ops.load_library()
    finally:
        cpu_ops._SOURCE = keep
        cpu_ops.load_library.cache_clear()
    if lib is None:
        sys.exit(f"the kernel at {rev} does not build")
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="HEAD~1", help="git revision (or file) of build A")
    ap.add_argument("--b", default="HEAD", help="git revision (or file) of build B")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    from banks import PROMPT_LEN, save_dynmole_banks
    from served import in_process_engine, serve_flags

    from adapters import BaseFingerprint
    from server.engine.protocol import GenerationRequest, SamplingParams
    from server.model import ModelConfig, ensure_default_model

    folder = ensure_default_model()
    cfg = ModelConfig.from_folder(folder)
    fp = BaseFingerprint.from_hf_config(cfg.raw)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"A": build(args.a, Path(tmp) / "a"), "B": build(args.b, Path(tmp) / "b")}
        names = save_dynmole_banks(Path(tmp), fp)
        engine = in_process_engine([*serve_flags(64, []), "--banks", tmp])
        registry = engine.adapter_provider
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist() for _ in range(32)]
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        runs = 0

        def run(build: str | None) -> float:
            nonlocal runs
            if build is not None:
                cpu_ops.load_library = lambda: libs[build]
                cache = registry.pool.state.cache
                for key in [k for k in cache if isinstance(k, tuple) and k[0] == "route_lora_groups"]:
                    del cache[key]  # groups built with the other build's library
            runs += 1
            reqs = [GenerationRequest(f"r{runs}-{i}", p, params, bank=names[i % 8] if build else None)
                    for i, p in enumerate(prompts)]
            t0 = time.perf_counter()
            engine.generate(reqs)
            return time.perf_counter() - t0

        run("A"), run("B"), run(None)  # warm: every bank's first step, both builds
        times: dict[str, list[float]] = {"base alone": [], "A": [], "B": []}
        for r in range(args.rounds):
            times["base alone"].append(run(None))
            for b in (("A", "B") if r % 2 == 0 else ("B", "A")):
                times[b].append(run(b))
    tokens = 32 * args.new_tokens
    print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds, 32 requests x {args.new_tokens} tokens over 8 DynMoLE "
          "banks\n")
    print("| system | tok/s, median (best) | time / base alone's, median of the rounds |\n|---|---|---|")
    for name, ts in times.items():
        label = {"A": f"8 banks, build A ({args.a})", "B": f"8 banks, build B ({args.b})"}.get(name, name)
        ratio = statistics.median(t / b for t, b in zip(ts, times["base alone"]))
        print(f"| {label} | {tokens / statistics.median(ts):.1f} ({tokens / min(ts):.1f}) | {ratio:.3f} |")
    print(f"\nB / A time, median of the rounds: {statistics.median(b / a for a, b in zip(times['A'], times['B'])):.3f}")


if __name__ == "__main__":
    main()
