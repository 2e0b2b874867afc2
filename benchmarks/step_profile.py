"""Where a decode step goes, on the embedded default: decode steps only (the prompts' prefill runs
before the timed and profiled steps), split into the base weights' GEMMs, the LM head, attention,
the other work inside the model's forward (norms, RoPE, activations, casts and the Python that
calls them per layer), the sampler, the model runner's own work (per-step metadata, logits
checks), and the engine outside the runner (scheduler, detokenization, events).

Variants, each an engine on the same folder, timed in alternation in one process:
``none`` (fp32 weights), ``auto`` (the GGUF's int4 blocks, int8 LM head), ``auto-floathead``
(``auto`` with the LM head in fp32, as main had it before issue #21's batch-invariant head).
A variant with the suffix ``-unfused`` runs with ``MOLESERVE_FUSED_DECODE=0`` (the per-layer Python
forward instead of the one-call C decode forward, ``server/model/fused_decode.py``); the switch is set
before each of its runs, so fused and unfused engines alternate in one process.

    python benchmarks/step_profile.py [--variants none auto auto-floathead] [--batch 1 8 32]
        [--steps 16] [--rounds 3] [--threads 2] [--top 0] [--no-profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GEMM_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
            "aten::linear", "aten::addmm", "aten::mm", "aten::_int_mm")
LABELS = ("step.forward", "step.lm_head", "step.attention", "step.sampler", "step.runner")


def label(cls, name: str, tag: str) -> None:
    """Wrap ``cls.name`` in a profiler range ``tag`` (Python and C++ calls alike)."""
    fn = getattr(cls, name)

    def wrapped(*a, **k):
        with torch.profiler.record_function(tag):
            return fn(*a, **k)

    setattr(cls, name, wrapped)


def use(variant: str) -> None:
    """Set the fused decode switch for ``variant``'s next run."""
    os.environ["MOLESERVE_FUSED_DECODE"] = "0" if variant.endswith("-unfused") else "1"


def build(variant: str, folder, max_seqs: int):
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    variant = variant.removesuffix("-unfused")
    quant = "none" if variant == "none" else "auto"
    engine = LLMEngine(EngineConfig(model=folder, device="cpu", dtype="float32", quantization=quant,
                                    kv_cache_memory=256 << 20, max_num_seqs=max_seqs))
    if variant == "auto-floathead":
        engine.model.lm_head_quant = None  # the fp32 (oneDNN-packed) head
    return engine


def start(engine, batch: int, steps: int, tag: str) -> None:
    """Queue ``batch`` 64-token prompts and step until every one has sampled its first token."""
    from server.engine.protocol import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(GenerationRequest(f"{tag}-{i}", list(range(1000 + i, 1064 + i)), params))
    sampled = 0
    while sampled < batch:
        sampled += len(engine.step())


def decode(engine, steps: int) -> float:
    """Seconds per decode step (mean over ``steps``), then drain."""
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t0) / steps
    while engine.has_unfinished():
        engine.step()
    return dt


def c_gemms_ms(model, rows: int, repeats: int = 5) -> float | None:
    """ms for one pass of every base linear's C kernel (what the fused forward calls per step) on
    ``rows`` rows, best of ``repeats``; None when the model has none."""
    import ctypes

    fn_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int)
    calls = []
    for layer in model.layers:
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            found = m.c_linear()
            if found is None:
                return None
            calls.append((fn_type(found[0]), found[1], m.in_features, m.out_features))
    x = torch.randn(rows, max(c[2] for c in calls))
    y = torch.empty(rows, max(c[3] for c in calls))
    threads = torch.get_num_threads()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fn, handle, _, _ in calls:
            fn(handle, x.data_ptr(), rows, y.data_ptr(), threads)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["none", "auto", "auto-floathead"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=0, help="print each variant's top ops (batch 1)")
    ap.add_argument("--no-profile", action="store_true", help="timings only, no breakdown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.profiler import ProfilerActivity, profile

    from server.engine.model_runner import ModelRunner
    from server.engine.paged_attention import PagedAttentionStep
    from server.engine.sampler import Sampler
    from server.model import LlamaModel, ensure_default_model

    label(LlamaModel, "forward", "step.forward")
    label(LlamaModel, "lm_head", "step.lm_head")
    label(PagedAttentionStep, "forward", "step.attention")  # the CPU kernel is a C++ call, not a torch op
    label(Sampler, "__call__", "step.sampler")
    label(ModelRunner, "run", "step.runner")

    folder = ensure_default_model()
    engines = {v: build(v, folder, max(args.batch)) for v in args.variants}
    for v, engine in engines.items():  # warm up
        use(v)
        start(engine, 1, 2, f"w-{v}")
        decode(engine, 2)
    wall: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):  # alternate variants (and batch sizes) within each round
        for b in args.batch:
            for v, engine in engines.items():
                use(v)
                start(engine, b, args.steps, f"t{r}-{b}-{v}")
                wall.setdefault((v, b), []).append(decode(engine, args.steps))
    print(f"\ndecode step after 64-token prompts, {args.threads} threads, {args.steps} steps per run, "
          f"{args.rounds} alternating rounds: ms per step, median (min-max)\n")
    print("| variant | " + " | ".join(f"batch {b}" for b in args.batch) + " |")
    print("|---|" + "---|" * len(args.batch))
    for v in engines:
        cells = []
        for b in args.batch:
            xs = sorted(wall[(v, b)])
            cells.append(f"{xs[len(xs) // 2] * 1e3:.1f} ({xs[0] * 1e3:.1f}-{xs[-1] * 1e3:.1f})")
        print(f"| {v} | " + " | ".join(cells) + " |")
    for v, engine in engines.items():  # what the fused forward's GEMMs alone cost (x in cache: a floor)
        if not v.endswith("-unfused"):
            floors = [c_gemms_ms(engine.model, b) for b in args.batch]
            if floors[0] is not None:
                print(f"\n{v}: the base linears' C kernels alone (fused forward's GEMMs), ms per step: "
                      + ", ".join(f"batch {b} {f:.1f}" for b, f in zip(args.batch, floors)))
    if args.no_profile:
        return

    print(f"\nbatch-1 breakdown (profiled run of {args.steps} decode steps; the profiler's own overhead "
          "inflates the Python-heavy columns): ms per step\n")
    print("| variant | step (profiled) | base GEMMs | LM head | attention | other in forward (small ops, per-layer Python) "
          "| sampler | runner (metadata, checks) | engine outside runner (scheduler, detokenize, events) | torch ops per step |")
    print("|---|" + "---|" * 9)
    tables = {}
    for v, engine in engines.items():
        use(v)
        start(engine, 1, args.steps, f"p-{v}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            total = (time.perf_counter() - t0) * 1e3 / args.steps
        while engine.has_unfinished():
            engine.step()
        avg = prof.key_averages()
        ms = {e.key: e.cpu_time_total / 1e3 / args.steps for e in avg}
        n = args.steps
        gemm = sum(ms.get(k, 0.0) for k in GEMM_OPS)
        head = ms.get("step.lm_head", 0.0)
        attn = ms.get("step.attention", 0.0)
        fwd, samp, runner = ms.get("step.forward", 0.0), ms.get("step.sampler", 0.0), ms.get("step.runner", 0.0)
        base = max(gemm - head, 0.0)  # the head's own GEMM is inside its label
        other = max(fwd - base - head - attn, 0.0)
        run_own = max(runner - fwd - samp, 0.0)
        outside = max(total - runner, 0.0)
        ops = sum(e.count for e in avg if not e.key.startswith("step.")) / n
        print(f"| {v} | {total:.1f} | {base:.1f} | {head:.1f} | {attn:.1f} | {other:.1f} | {samp:.1f} | "
              f"{run_own:.1f} | {outside:.1f} | {ops:.0f} |")
        if args.top:
            tables[v] = avg.table(sort_by="self_cpu_time_total", row_limit=args.top)
    for v, table in tables.items():
        print(f"\n--- {v}: top ops by self CPU time ({args.steps} decode steps)\n{table}")


if __name__ == "__main__":
    main()
