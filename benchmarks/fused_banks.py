"""Bank rows in the fused decode step (issue #21): 32 requests over 8 DynMoLE banks vs the base model
alone, on the embedded default, the decode steps with bank rows in the one-call C forward
(``server/model/fused_decode.py``, banks' ``route_lora`` as per-linear hooks) or on the per-layer
Python path (``MOLESERVE_FUSED_DECODE=0`` while the banks run; the base always fused). The three
runs alternate in one process (``--repeats`` rounds, each system's best kept): the machine is shared.

    python benchmarks/fused_banks.py [--quantization auto] [--tokens 32] [--requests 32] [--repeats 3]
        [--threads 2] [--pool-dtype float16|bfloat16|float32|int8]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from banks import dynmole_bank, requests, run  # noqa: E402
from adapters import BaseFingerprint  # noqa: E402
from adapters.runtime import BankRegistry  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.model import ensure_default_model  # noqa: E402
from server.model.fused_decode import ENV_SWITCH  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="auto", choices=("none", "auto", "int8", "int4"))
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-dtype", default="float16", choices=("float16", "bfloat16", "float32", "int8"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=ensure_default_model(), device="cpu", dtype="float32",
                                    quantization=args.quantization, kv_cache_memory=512 << 20, max_num_seqs=32,
                                    max_num_batched_tokens=512))
    from prometheus_client import CollectorRegistry

    from server.metrics import ServerMetrics

    engine.set_stats_sink(ServerMetrics("bench", registry=CollectorRegistry()))  # as served: routing statistics
    cfg = engine.model_config
    registry = BankRegistry(cfg, dtype=getattr(torch, args.pool_dtype))
    names = []
    for i in range(8):
        registry.add(dynmole_bank(BaseFingerprint.from_hf_config(cfg.raw), f"dyn{i}", seed=i))
        names.append(f"dyn{i}")
    engine.set_adapter_provider(registry)
    model, vocab = engine.model, cfg.vocab_size
    run(engine, requests(8, names, 4, vocab))  # warm-up: kernel builds, allocator
    best = {"base": math.inf, "banks fused": math.inf, "banks per-layer": math.inf}
    steps = dict.fromkeys(best, 0)
    produced = 0
    for _ in range(args.repeats):
        for system in best:
            os.environ[ENV_SWITCH] = "0" if system == "banks per-layer" else "1"
            before = model.fused_decode_steps
            dt, produced = run(engine, requests(args.requests, [None] if system == "base" else names, args.tokens,
                                                vocab, seed=1))
            best[system] = min(best[system], dt)
            steps[system] = model.fused_decode_steps - before
    os.environ[ENV_SWITCH] = "1"
    base = produced / best["base"]
    print(f"quantization {args.quantization} ({model.quantization}), {args.requests} requests x {args.tokens} "
          f"tokens, 8 DynMoLE banks (6 experts, r=16, gate/up/down, pool {args.pool_dtype}), "
          f"{args.threads} threads, best of {args.repeats} alternating rounds")
    print("| system | tok/s | vs base | fused decode steps (last run) |")
    print("|---|---|---|---|")
    for system, dt in best.items():
        tps = produced / dt
        print(f"| {system} | {tps:.1f} | {tps / base:.2f}x | {steps[system]} |")


if __name__ == "__main__":
    main()
