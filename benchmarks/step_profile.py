"""Where a batch-1 decode step goes, on the embedded default: the engine's step wall time split into
the base weights' GEMMs, attention, the other torch ops (norms, RoPE, activations, casts) and what
is not a torch op (Python: scheduling, metadata, sampling, detokenization). Prints the
BENCHMARKS.md table ("Quantized base: a batch-1 step").

    python benchmarks/step_profile.py [--quantizations none auto] [--tokens 32] [--threads 2] [--top 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GEMM_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
            "aten::linear", "aten::addmm", "aten::mm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantizations", nargs="+", default=["none", "auto"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.profiler import ProfilerActivity, profile

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.protocol import GenerationRequest, SamplingParams
    from server.model import ensure_default_model

    from server.engine.paged_attention import PagedAttentionStep

    forward = PagedAttentionStep.forward

    def labelled(self, *a, **k):  # the attention kernel is a C++ call, not a torch op: label it
        with torch.profiler.record_function("paged_attention"):
            return forward(self, *a, **k)

    PagedAttentionStep.forward = labelled
    folder = ensure_default_model()
    engines = {q: LLMEngine(EngineConfig(model=folder, device="cpu", dtype="float32", quantization=q,
                                         kv_cache_memory=256 << 20, max_num_seqs=8)) for q in args.quantizations}
    prompt = list(range(1000, 1064))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    wall = {}
    for q, engine in engines.items():  # warm up, then alternate timed runs
        engine.generate([GenerationRequest(f"w-{q}", prompt, params)])
    for r in range(3):
        for q, engine in engines.items():
            t0 = time.perf_counter()
            engine.generate([GenerationRequest(f"t{r}-{q}", prompt, params)])
            wall[q] = min(wall.get(q, 1e9), (time.perf_counter() - t0) / args.tokens)
    print(f"\nbatch-1 decode, {args.tokens} tokens after a 64-token prompt, {args.threads} threads; "
          "per token (best of 3 alternating runs, prefill included in the run)\n")
    print("| base weights | ms/token (wall) | GEMMs | attention | other torch ops | outside torch ops (Python) | torch ops per token |")
    print("|---|---|---|---|---|---|---|")
    tables = {}
    for q, engine in engines.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            engine.generate([GenerationRequest(f"p-{q}", prompt, params)])
            total = time.perf_counter() - t0
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "moleserve", "torch_ops"))]
        top_level = prof.key_averages()
        gemm = sum(e.cpu_time_total for e in top_level if e.key in GEMM_OPS) / 1e3
        attn = sum(e.cpu_time_total for e in top_level if e.key == "paged_attention") / 1e3
        # time inside torch ops (each op's self time once; the attention label's self time is the C++ kernel)
        self_all = sum(e.self_cpu_time_total for e in top_level) / 1e3
        ops = sum(e.count for e in events)
        other = max(self_all - gemm - attn, 0.0)
        outside = max(total * 1e3 - self_all, 0.0)
        n = args.tokens
        print(f"| {q} | {wall[q] * 1e3:.1f} | {gemm / n:.1f} | {attn / n:.1f} | {other / n:.1f} | {outside / n:.1f} | {ops / n:.0f} |")
        tables[q] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    for q, table in tables.items():
        print(f"\n--- {q}: top ops by self CPU time (profiled run, {args.tokens} tokens)\n{table}")


if __name__ == "__main__":
    main()
