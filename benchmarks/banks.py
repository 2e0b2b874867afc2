"""Expert banks end to end on the default model (CPU): tokens/s with banks vs the base model and
vs transformers + the `mixlora` package, hot-load time, routing statistics. Prints the tables of
BENCHMARKS.md ("Expert banks").

    python benchmarks/banks.py [--threads 2] [--tokens 32] [--repeats 3] [--pool-dtypes float16,float32] [--skip-peer]
                               [--profile] [--no-metrics] [--quantization none|auto|int8|int4]

``--pool-dtypes``: the bank pool's storage dtypes to measure, each with its own pool of the same 8
banks, their runs alternating with the base model's. The first is the server's default on this
model (``serve --bank-dtype auto``: float16 for a float32 CPU model, int8 on a quantized one, as with
``--quantization auto``); float32 keeps the weights exact.

The engine reports every step to the server's Prometheus sink (routing statistics included), as
``moleserve serve`` does; ``--no-metrics`` leaves it out (the runs before the third session did).

Banks are random (router weights normal so routing is non-trivial, B non-zero). One run, side by
side; the machine is shared, so numbers move between runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adapters import BaseFingerprint, ExpertBank, LayerAdapters, LinearExperts, RoutingConfig  # noqa: E402
from adapters.runtime import BankRegistry  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.protocol import GenerationRequest, SamplingParams  # noqa: E402
from server.model import ensure_default_model  # noqa: E402

PROMPT_LEN = 16


def dynmole_bank(fp: BaseFingerprint, name: str, seed: int, experts=6, r=16, router_scale=1.0, *,
                 device: torch.device | str = "cpu", expert_layers: int | None = None) -> ExpertBank:
    """A random DynMoLE bank on gate/up/down (router weights normal, so routing is non-trivial; B
    non-zero), drawn on ``device``; only the first ``expert_layers`` layers carry experts (all by
    default). The benchmarks' shared builder (gpu.py, bank_step.py, prefix_cache.py import it)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for n in range(fp.num_hidden_layers):
        la = LayerAdapters()
        for t in ("gate_proj", "up_proj", "down_proj") if expert_layers is None or n < expert_layers else ():
            i, o = fp.linear_shape(t)
            la.linears[t] = LinearExperts(
                lora_a=torch.randn(experts, r, i, generator=gen, device=device) / math.sqrt(i),
                lora_b=torch.randn(experts, o, r, generator=gen, device=device) * 0.01,
                scaling=2.0,
                router=torch.randn(experts, i, generator=gen, device=device) * (2.0 * router_scale / math.sqrt(i)))
        layers.append(la)
    return ExpertBank(name=name, version="1", kind="dynmole", base=fp, rank=r, alpha=2.0 * r, use_rslora=False,
                      routing=RoutingConfig("dynmole"), targets=("gate_proj", "up_proj", "down_proj"), layers=layers)



def save_dynmole_banks(folder: Path, fp: BaseFingerprint, n: int = 8) -> list[str]:
    """``n`` random DynMoLE banks (``dynmole_bank``, seeds 0..n-1) saved under ``folder`` as
    ``dyn0``..: a ``serve --banks`` folder; their names."""
    names = [f"dyn{i}" for i in range(n)]
    for i, name in enumerate(names):
        dynmole_bank(fp, name, seed=i).save(folder / name)
    return names

def requests(n: int, banks: list[str | None], max_tokens: int, vocab: int, seed=0) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    return [GenerationRequest(f"r{i}", torch.randint(10, vocab, (PROMPT_LEN,), generator=gen).tolist(),
                              SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                              bank=banks[i % len(banks)]) for i in range(n)]


def run(engine: LLMEngine, reqs) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    dt = time.perf_counter() - t0
    return dt, sum(len(e.token_ids) for evs in out.values() for e in evs)


class StatsProbe:
    """Wraps a registry: reduces each step's routing statistics once the next step starts."""

    def __init__(self, registry: BankRegistry):
        self.registry, self.last, self.totals = registry, None, {}

    def acquire(self, bank):
        return self.registry.acquire(bank)

    def release(self, h):
        self.registry.release(h)

    def build_step(self, handles, num_tokens):
        self.flush()
        self.last = self.registry.build_step(handles, num_tokens)
        return self.last

    def flush(self):
        if self.last is not None:
            for name, s in self.last.routing_stats().banks.items():
                t = self.totals.setdefault(name, [0, 0, 0, 0])
                k = torch.as_tensor(s.experts_per_decision).double()
                t[0] += s.decisions
                t[1] += s.broadcast
                t[2] += float((k * torch.arange(k.numel())).sum())
                t[3] += s.entropy_sum
            self.last = None


def mixlora_peer(model_dir: Path, folders: list[Path], reqs, max_tokens: int) -> tuple[float, int]:
    """transformers + mixlora: each bank's requests batched with left padding, one bank at a time."""
    from mixlora.model import inject_adapter_in_model, load_adapter_weights
    from transformers import AutoModelForCausalLM

    models = []
    for folder in folders:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float32)
        inject_adapter_in_model(hf, config, weights)
        hf.eval()
        for layer in hf.model.layers:
            for moe in layer.mlp.mixlora_moes.values():
                for e in moe.experts_.values():
                    e.eval()
        models.append(hf)
    t0 = time.perf_counter()
    produced = 0
    with torch.inference_mode():
        for b, hf in enumerate(models):
            mine = [r for i, r in enumerate(reqs) if i % len(models) == b]
            ids = torch.tensor([r.prompt_token_ids for r in mine])  # equal lengths: padding is a no-op here
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
            produced += (out.shape[1] - ids.shape[1]) * out.shape[0]
    return time.perf_counter() - t0, produced


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating runs of base / DynMoLE and of ours / the MixLoRA peer; best of each kept")
    ap.add_argument("--pool-dtypes", default="float16,float32",
                    help="comma-separated pool storage dtypes (float16, bfloat16, float32) for the DynMoLE rows; "
                    "the MixLoRA rows use the first")
    ap.add_argument("--router-scale", type=float, default=1.0,
                    help="multiply the random routers: 1 gives near-uniform routing (most tokens broadcast, as an "
                    "untrained DynMoLE bank); larger gives the peaked routing of a trained one")
    ap.add_argument("--profile", action="store_true", help="print a torch profiler table of the DynMoLE run")
    ap.add_argument("--no-metrics", action="store_true",
                    help="run without the server's Prometheus sink (by default every step reports to one, as served)")
    ap.add_argument("--quantization", default="none", choices=("none", "auto", "int8", "int4"),
                    help="the base weights (auto: the embedded default's GGUF Q4_1 blocks, as served by default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model()
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", quantization=args.quantization,
                                    kv_cache_memory=512 << 20,
                                    max_num_seqs=32, max_num_batched_tokens=512))
    if not args.no_metrics:  # as `moleserve serve` runs: per-step routing statistics into Prometheus series
        from prometheus_client import CollectorRegistry

        from server.metrics import ServerMetrics

        engine.set_stats_sink(ServerMetrics("bench", registry=CollectorRegistry()))
    cfg = engine.model_config
    fp = BaseFingerprint.from_hf_config(cfg.raw)
    vocab = cfg.vocab_size
    rows = []

    # --- 1. 32 requests over 8 DynMoLE banks vs the base model --------------------------------------
    dtypes = [d.strip() for d in args.pool_dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float16", "bfloat16", "float32") for d in dtypes):
        ap.error("--pool-dtypes: float16, bfloat16 and/or float32")
    registries = {d: BankRegistry(cfg, dtype=getattr(torch, d)) for d in dtypes}
    registry = registries[dtypes[0]]
    tmp = Path(tempfile.mkdtemp(prefix="moleserve-bench-"))
    banks = [dynmole_bank(fp, f"dyn{i}", seed=i, router_scale=args.router_scale) for i in range(8)]
    banks[0].save(tmp / "dyn0")
    registry.add_root(tmp)
    t0 = time.perf_counter()
    registry.load_sync("dyn0", tmp / "dyn0")
    hot_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in banks[1:]:
        registry.add(b)
    add_mem = (time.perf_counter() - t0) / 7
    for d in dtypes[1:]:
        for b in banks:
            registries[d].add(b)
    run(engine, requests(4, [None], 4, vocab))  # warm-up (kernel build, allocator)
    for reg in registries.values():
        engine.set_adapter_provider(reg)
        run(engine, requests(8, [b.name for b in banks], 4, vocab))
    # base and DynMoLE runs alternate (--repeats times each), each system's best kept: this VM's
    # load comes and goes, and a ratio of two runs minutes apart can be off by a third
    base_dt, dyn_dt, dyn_n = math.inf, {}, 0
    for rep in range(args.repeats):
        b_dt, base_n = run(engine, requests(32, [None], args.tokens, vocab, seed=1))
        base_dt = min(base_dt, b_dt)
        for d, reg in registries.items():
            engine.set_adapter_provider(reg)
            if args.profile and rep == 0:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run(engine, requests(32, [b.name for b in banks], 8, vocab, seed=2))
                print(f"pool {d}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            d_dt, dyn_n = run(engine, requests(32, [b.name for b in banks], args.tokens, vocab, seed=1))
            dyn_dt[d] = min(dyn_dt.get(d, math.inf), d_dt)
    base_tps = base_n / base_dt
    rows.append(("32 req, base model", base_tps, "-", "-"))
    for i, d in enumerate(dtypes):
        tps = dyn_n / dyn_dt[d]
        print(f"[partial] base {base_tps:.1f} tok/s, 8 DynMoLE banks in a {d} pool {tps:.1f} tok/s", flush=True)
        note = " (default)" if d == "float16" else (" (exact)" if d == "float32" else "")
        rows.append((f"32 req over 8 DynMoLE banks (6 experts, r=16, gate/up/down; pool {d}{note})", tps,
                     f"{tps / base_tps:.2f}x base", ">= 0.75x base"))
    # prefill: one step over the 32 prompts (512 tokens), max_tokens 1, alternating as above
    pre_base, pre_dyn = math.inf, {}
    for rep in range(args.repeats):
        engine.set_adapter_provider(registry)
        pre_base = min(pre_base, run(engine, requests(32, [None], 1, vocab, seed=10 + rep))[0])
        for d, reg in registries.items():
            engine.set_adapter_provider(reg)
            pre_dyn[d] = min(pre_dyn.get(d, math.inf), run(engine, requests(32, [b.name for b in banks], 1, vocab,
                                                                             seed=10 + rep))[0])
    prefill = [("base model", pre_base)] + [(f"8 DynMoLE banks, pool {d}", pre_dyn[d]) for d in dtypes]
    engine.set_adapter_provider(registry)
    probe = StatsProbe(registry)
    engine.set_adapter_provider(probe)
    run(engine, requests(32, [b.name for b in banks], 8, vocab, seed=3))
    probe.flush()
    dyn_stats = dict(probe.totals)
    bank_mb = registry.list()[0]["bytes"] / 2**20
    for d in dtypes[1:]:  # free the other pools before the MixLoRA part
        for b in banks:
            registries[d].unload_sync(b.name)

    # --- 2. 16 requests over 4 MixLoRA banks vs transformers + mixlora --------------------------------
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.adapters.bank_builders import write_mixlora

    mix_folders = []
    for i in range(4):
        folder = tmp / f"mix{i}"
        write_mixlora(folder, fp, r=16, alpha=32, num_experts=8, top_k=2,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), seed=i)
        registry.load_sync(f"mix{i}", folder)
        mix_folders.append(folder)
    engine.set_adapter_provider(registry)
    mix_names = [f"mix{i}" for i in range(4)]
    mix_tokens = min(args.tokens, 16)
    run(engine, requests(4, mix_names, 2, vocab))
    mix_dt, mix_n = run(engine, requests(16, mix_names, mix_tokens, vocab, seed=4))
    mix_tps = mix_n / mix_dt
    print(f"[partial] 4 MixLoRA banks {mix_tps:.1f} tok/s", flush=True)
    probe = StatsProbe(registry)
    engine.set_adapter_provider(probe)
    run(engine, requests(16, mix_names, 8, vocab, seed=5))
    probe.flush()
    mix_stats = dict(probe.totals)
    if args.skip_peer:
        peer = "skipped"
        rows.append(("16 req over 4 MixLoRA banks (8 experts top-2, r=16, all 7 targets)", mix_tps, peer, ">= 5x peer"))
    else:
        peer_dt, peer_n = mixlora_peer(model_dir, mix_folders, requests(16, mix_names, mix_tokens, vocab, seed=4), mix_tokens)
        engine.set_adapter_provider(registry)
        for _ in range(args.repeats - 1):  # alternate, best of each (as for base / DynMoLE)
            mix_dt = min(mix_dt, run(engine, requests(16, mix_names, mix_tokens, vocab, seed=4))[0])
            peer_dt = min(peer_dt, mixlora_peer(model_dir, mix_folders, requests(16, mix_names, mix_tokens, vocab,
                                                                                 seed=4), mix_tokens)[0])
        mix_tps, peer_tps = mix_n / mix_dt, peer_n / peer_dt
        rows.append(("16 req, transformers + mixlora (per bank, batched)", peer_tps, "-", "-"))
        rows.append(("16 req over 4 MixLoRA banks (8 experts top-2, r=16, all 7 targets)", mix_tps,
                     f"{mix_tps / peer_tps:.1f}x peer", ">= 5x peer"))

    print(f"threads={args.threads}, {args.tokens} new tokens per request (MixLoRA: {mix_tokens}), prompts {PROMPT_LEN} tokens\n")
    print("| workload | tokens/s | ratio | target |\n|---|---|---|---|")
    for name, tps, ratio, target in rows:
        print(f"| {name} | {tps:.1f} | {ratio} | {target} |")
    print(f"\nPrefill of 32 prompts x {PROMPT_LEN} tokens in one step (max_tokens 1): "
          + ", ".join(f"{name} {dt * 1000:.0f} ms ({dt / pre_base:.2f}x)" for name, dt in prefill))
    print(f"\nHot load of one DynMoLE bank ({bank_mb:.0f} MB in a {dtypes[0]} pool, our format, from disk -> pool): {hot_load * 1000:.0f} ms; "
          f"pack + install of an in-memory bank: {add_mem * 1000:.0f} ms")
    print("\n| banks | decisions | experts per decision | broadcast rate | mean normalised entropy |\n|---|---|---|---|---|")
    for label, stats in (("8 DynMoLE (per linear)", dyn_stats), ("4 MixLoRA (per block)", mix_stats)):
        d = sum(v[0] for v in stats.values())
        print(f"| {label} | {d} | {sum(v[2] for v in stats.values()) / max(d, 1):.2f} | "
              f"{sum(v[1] for v in stats.values()) / max(d, 1):.1%} | {sum(v[3] for v in stats.values()) / max(d, 1):.2f} |")


if __name__ == "__main__":
    main()
