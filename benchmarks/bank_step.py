"""Per-linear cost of the bank runtime at decode: one ``BankStep.linear`` call (routing, plan,
routed LoRA) at T tokens spread over 8 DynMoLE banks (6 experts, r=16, gate/up/down), SmolLM2-135M
shapes. Prints a small table (us per call, best of repeats) for each variant side by side.

    python benchmarks/bank_step.py [--tokens 32] [--threads 2] [--repeats 7] [--baseline REV]

``--baseline REV`` also times ``adapters/runtime/step.py`` as it was at git revision REV (loaded
from git beside the current one, same pool and banks), so before/after are measured in one run on
this shared machine: compare the ratio column, not absolute numbers across runs.
Only layer 0 carries experts (the cost per linear does not depend on the layer).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapters import BaseFingerprint  # noqa: E402
from adapters.runtime import BankRegistry  # noqa: E402
from benchmarks.banks import dynmole_bank  # noqa: E402
from server.model import ModelConfig, ensure_default_model  # noqa: E402


def load_baseline(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:adapters/runtime/step.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path("/tmp") / f"moleserve_step_{rev.replace('/', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("adapters.runtime._baseline_step", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "adapters.runtime"
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.BankStep


def best_us(fn, repeats: int, inner: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git revision of adapters/runtime/step.py to compare with")
    ap.add_argument("--pool-dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig.from_folder(ensure_default_model())
    fp = BaseFingerprint.from_hf_config(cfg.raw)
    banks = [dynmole_bank(fp, f"dyn{i}", seed=i, expert_layers=1) for i in range(8)]
    t = args.tokens
    x = torch.randn(t, cfg.hidden_size)
    h = torch.randn(t, cfg.intermediate_size)
    steps = {}
    from adapters.runtime.step import BankStep

    classes = {"current": BankStep}
    if args.baseline:
        classes = {f"baseline ({args.baseline})": load_baseline(args.baseline), **classes}
    for dt_name in args.pool_dtypes.split(","):
        registry = BankRegistry(cfg, dtype=getattr(torch, dt_name))
        for b in banks:
            registry.add(b)
        handles = [registry.acquire(f"dyn{i}") for i in range(8)]
        seq = [handles[i % 8] for i in range(t)]
        probe = registry.build_step(seq, [1] * t)
        for label, cls in classes.items():
            steps[(label, dt_name)] = (cls, probe)

    calls = {
        "gate+up (fused call)": lambda s: s.linear(0, ("gate_proj", "up_proj"), x, torch.zeros(t, 2 * cfg.intermediate_size)),
        "down": lambda s: s.linear(0, ("down_proj",), h, torch.zeros(t, cfg.hidden_size)),
    }
    rows = []
    for (label, dt_name), (cls, probe) in steps.items():
        for stats in (True, False):
            def make():
                return cls(probe.cfg, probe.state, probe.banks, probe.token_bank, collect_stats=stats,
                           backend=probe.backend)

            step = make()
            res = {}
            for name, fn in calls.items():
                def run(fn=fn):
                    fn(step)
                    step._records.clear()
                res[name] = best_us(run, args.repeats, args.inner)
            per_linear = (res["gate+up (fused call)"] + res["down"]) / 3
            rows.append((label, dt_name, stats, res["gate+up (fused call)"], res["down"], per_linear))
    base = {(d, s): pl for lab, d, s, _, _, pl in rows if lab.startswith("baseline")}
    print(f"T={t}, 8 DynMoLE banks x 6 experts, r=16, threads={args.threads}; us per call (best of {args.repeats}x{args.inner})")
    print("| step.py | pool | stats | gate+up (1 call) | down | per routed linear | vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for lab, d, s, gu, dn, pl in rows:
        ratio = f"{base[(d, s)] / pl:.2f}x" if (d, s) in base else "-"
        print(f"| {lab} | {d} | {'on' if s else 'off'} | {gu:,.0f} | {dn:,.0f} | {pl:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
