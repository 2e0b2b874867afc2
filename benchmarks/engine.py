"""Engine throughput vs transformers on the default model, CPU; prints the BENCHMARKS.md table.

    python benchmarks/engine.py [--threads 2] [--new-tokens 64] [--concurrency 1 8 32] [--repeats 2] [--no-cb]

Workload: N requests with prompts of 64-128 tokens (seeded random token ids), N new tokens each
(greedy, ignore_eos: every system generates exactly the same number of tokens). Systems, side by
side in one process so machine load hits them alike:
- moleserve: LLMEngine, all N requests submitted at once, stepped to completion;
- transformers generate: one batched ``generate`` call on the left-padded prompts;
- transformers continuous batching (``generate_batch``), when it runs on this machine.
Reports generated tokens/s and per-token latency (the mean gap between a request's tokens; for
batched generate, wall time / new tokens), and, at the largest N, moleserve's median decode step
against the matmul floor (every linear of one step at N tokens, timed alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (int(torch.randint(64, 129, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


class StepTimes:
    def __init__(self):
        self.steps, self.requests = [], []

    def on_step(self, s):
        self.steps.append(s)

    def on_request_finished(self, s):
        self.requests.append(s)


def run_engine(engine, prompts, new_tokens):
    from server.engine.protocol import GenerationRequest, SamplingParams

    sink = StepTimes()
    engine.set_stats_sink(sink)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([GenerationRequest(f"b{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    gaps = [g for r in sink.requests for g in r.inter_token_s]
    full = [s.duration_s for s in sink.steps if s.num_decode_tokens == len(prompts) and not s.num_prefill_tokens]
    return wall, statistics.mean(gaps), (statistics.median(full) if full else float("nan"))


def run_hf_generate(hf, prompts, new_tokens, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad_id)
    wall = time.perf_counter() - t0
    return wall, wall / new_tokens


def run_hf_cb(hf, prompts, new_tokens):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    t0 = time.perf_counter()
    hf.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    return time.perf_counter() - t0


def matmul_floor_ms(model, n: int, repeats: int = 5) -> float:
    """Every base GEMM of one forward (all layers + lm_head) on n tokens, best of ``repeats``, through
    the same path the engine runs (``TargetLinear.base``: oneDNN-packed weights on CPU fp32)."""
    x = torch.randn(n, model.config.hidden_size)
    mid = torch.randn(n, model.config.intermediate_size)
    qo = torch.randn(n, model.config.q_size)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in model.layers:
                layer.self_attn.qkv_proj.base(x)
                layer.self_attn.o_proj.base(qo)
                layer.mlp.gate_up_proj.base(x)
                layer.mlp.down_proj.base(mid)
            model.lm_head(x)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-cb", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternating moleserve / HF generate runs per concurrency; best of each kept (noisy VM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.model import ensure_default_model

    folder = ensure_default_model()
    engine = LLMEngine(EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_memory=512 << 20,
                                    max_num_seqs=max(args.concurrency), max_num_batched_tokens=512))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    vocab = engine.model_config.vocab_size
    nt = args.new_tokens
    run_engine(engine, prompts_for(2, vocab, 99), 4)  # warm up (kernel build, allocator)

    rows, floor_line = [], ""
    for n in args.concurrency:
        prompts = prompts_for(n, vocab, seed=n)
        e_wall, e_lat, e_step = run_engine(engine, prompts, nt)
        with torch.inference_mode():
            h_wall, h_lat = run_hf_generate(hf, prompts, nt, pad)
        for _ in range(args.repeats - 1):  # alternate the two, keep each one's best run
            e = run_engine(engine, prompts, nt)
            if e[0] < e_wall:
                e_wall, e_lat, e_step = e
            with torch.inference_mode():
                h = run_hf_generate(hf, prompts, nt, pad)
            if h[0] < h_wall:
                h_wall, h_lat = h
        cb = "n/a"
        if not args.no_cb:
            try:
                with torch.inference_mode():
                    cb = f"{n * nt / run_hf_cb(hf, prompts, nt):.0f}"
            except Exception as exc:  # noqa: BLE001 - report why it did not run
                cb = f"failed ({type(exc).__name__})"
        e_tps, h_tps = n * nt / e_wall, n * nt / h_wall
        rows.append(f"| {n} | {e_tps:.0f} | {e_lat * 1e3:.1f} | {h_tps:.0f} | {h_lat * 1e3:.1f} | {cb} | "
                    f"{e_tps / h_tps:.2f}x |")
        if n == max(args.concurrency):
            floor = matmul_floor_ms(engine.model, n)
            floor_line = (f"Decode step at {n} sequences: median {e_step * 1e3:.1f} ms; matmul floor "
                          f"{floor:.1f} ms (all linears at {n} tokens, timed alone) -> {floor / (e_step * 1e3):.0%} "
                          f"of the floor's speed.")
    print(f"torch {torch.__version__}, {args.threads} threads, default model fp32, prompts 64-128 tokens, "
          f"{nt} new tokens each, greedy\n")
    print("| concurrent | moleserve tok/s | moleserve ms/token | HF generate tok/s | HF generate ms/token "
          "| HF continuous batching tok/s | moleserve / HF generate |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(floor_line)


if __name__ == "__main__":
    main()
