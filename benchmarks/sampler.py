"""Time per call of the sampler against one softmax of the same [B, V]; prints the BENCHMARKS.md table.

    python benchmarks/sampler.py [--threads 2] [--vocab 49152] [--batches 1,32,256] [--calls 30] [--nucleus-ab]

Each cell builds the step's ``SamplingBatch`` (timed with the call: the engine pays both) and samples
from LM-like logits (a N(0, 1.5^2) body plus 20 tokens raised by ~14 per row, so a top-p of 0.9 holds a
few to a few hundred tokens; a quarter of the rows are flat, where the nucleus holds thousands).
Calls of the sampler and of ``torch.softmax`` alternate, so both see the same machine load. On a
loaded machine every parallel ATen op may wait one scheduler tick (~15 ms) for its second thread:
the median then counts ops more than it measures them, and ``min`` shows the uncontended cost.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from server.engine.protocol import SamplingParams  # noqa: E402
from server.engine.sampler import Sampler, SamplingBatch, make_generator  # noqa: E402

EOS = (2,)


def lm_logits(B: int, V: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(B, V, generator=gen) * 1.5
    spikes = torch.randint(0, V, (B, 20), generator=gen)
    heights = 14.0 + torch.randn(B, 20, generator=gen) * 3.0
    heights[3::4] = 0.0  # flat rows: top-p 0.9 keeps thousands of tokens
    return x.scatter_(1, spikes, heights.clamp(min=0) + x.gather(1, spikes))


def configs(B: int, V: int, rng: random.Random):
    def hist(n_lo=64, n_hi=700):
        return [rng.randrange(V) for _ in range(rng.randint(n_lo, n_hi))]

    def plain(p: SamplingParams):
        return [p] * B, [[1, 2, 3]] * B, [[]] * B, [None] * B

    yield "greedy", plain(SamplingParams(temperature=0.0))
    yield "temperature=0.8", plain(SamplingParams(temperature=0.8))
    yield "top_k=50", plain(SamplingParams(temperature=0.8, top_k=50))
    yield "top_p=0.9", plain(SamplingParams(temperature=0.8, top_p=0.9))
    yield "min_p=0.05", plain(SamplingParams(temperature=0.8, min_p=0.05))
    outs = [hist(32, 350) for _ in range(B)]
    prompts = [hist(32, 350) for _ in range(B)]
    pen = [SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5)] * B
    # prompts as the model runner hands them: each sequence's cached long tensor (Sequence.prompt_tensor)
    yield "penalties (rep+freq+pres), greedy", (pen, [torch.tensor(p) for p in prompts], outs, [None] * B)
    long_prompts = [torch.tensor(hist(2000, 2000)) for _ in range(B)]
    yield "penalties, 2000-token prompts, greedy", (pen, long_prompts, outs, [None] * B)
    yield "logprobs=5, temperature=0.8", plain(SamplingParams(temperature=0.8, logprobs=5))
    yield "logit_bias (20 tokens), greedy", plain(SamplingParams(
        temperature=0.0, logit_bias={rng.randrange(V): rng.uniform(-100, 100) for _ in range(20)}))
    # a request biasing every token (a hostile tenant's): one dense row, built once per request
    yield "logit_bias (every token), greedy", plain(SamplingParams(
        temperature=0.0, logit_bias={t: rng.uniform(-1, 1) for t in range(V)}))
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.95),
             SamplingParams(temperature=1.0, top_k=40, seed=1), SamplingParams(temperature=0.9, min_p=0.1, logprobs=3),
             SamplingParams(temperature=0.6, presence_penalty=0.5, repetition_penalty=1.05, min_tokens=4)]
    params = [kinds[i % len(kinds)] for i in range(B)]
    gens = [make_generator(i, "cpu") if p.seed is not None else None for i, p in enumerate(params)]
    yield "mixed batch", (params, [torch.tensor(p) for p in prompts], outs, gens)


def measure(B: int, V: int, calls: int, sampler: Sampler, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logits = lm_logits(B, V, gen)
    rows = []
    for name, (params, prompts, outs, gens) in configs(B, V, rng):
        def call():
            batch = SamplingBatch.build(params, prompts, outs, gens, "cpu", eos_token_ids=EOS)
            return sampler(logits, batch)

        call(), logits.softmax(-1)  # warm up
        ts, ss = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            logits.softmax(-1)
            t2 = time.perf_counter()
            ts.append((t1 - t0) * 1e3)
            ss.append((t2 - t1) * 1e3)
        rows.append((name, B, statistics.median(ts), statistics.median(ss), min(ts), min(ss)))
    return rows


def nucleus_ab(B: int, V: int, calls: int, sampler: Sampler, seed: int = 0):
    """The configs with top-p, with large nuclei placed by their histogram (the sampler's path) and by
    a full sort (the path before it), calls alternating: (name, B, hist median, sort median, hist min,
    sort min); the two must sample the same tokens (the rows' nuclei have no ties at their edge)."""
    from server.engine import sampler as sampler_module

    hist = sampler_module._top_p_by_histogram
    gen = torch.Generator().manual_seed(seed)
    logits = lm_logits(B, V, gen)
    rows = []
    for name, (params, prompts, outs, gens) in configs(B, V, random.Random(seed)):
        if not any(p.top_p < 1 for p in params):
            continue

        def call(by_histogram: bool):
            sampler_module._top_p_by_histogram = hist if by_histogram else (lambda *a: None)
            try:
                for g, p in zip(gens, params):  # the same draws for both paths
                    if g is not None:
                        g.manual_seed(p.seed)
                torch.manual_seed(seed)
                batch = SamplingBatch.build(params, prompts, outs, gens, "cpu", eos_token_ids=EOS)
                t0 = time.perf_counter()
                out = sampler(logits, batch)
                return time.perf_counter() - t0, out.token_ids
            finally:
                sampler_module._top_p_by_histogram = hist

        assert call(True)[1] == call(False)[1], name
        th, ts = [], []
        for _ in range(calls):
            th.append(call(True)[0] * 1e3)
            ts.append(call(False)[0] * 1e3)
        rows.append((name, B, statistics.median(th), statistics.median(ts), min(th), min(ts)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--nucleus-ab", action="store_true",
                    help="only the top-p configs, large nuclei by histogram (today) against a full sort (before)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler()
    if args.nucleus_ab:
        print(f"V = {args.vocab}, {args.threads} threads, {args.calls} alternating calls per cell (ms per call, "
              "SamplingBatch.build excluded)\n")
        print("| config | B | histogram (median) | sort (median) | ratio (median) | histogram (min) | sort (min) |")
        print("|---|---|---|---|---|---|---|")
        with torch.inference_mode():
            for B in [int(b) for b in args.batches.split(",")]:
                for name, b, h, srt, hmin, smin in nucleus_ab(B, args.vocab, args.calls, sampler):
                    print(f"| {name} | {b} | {h:.2f} | {srt:.2f} | {h / srt:.2f}x | {hmin:.2f} | {smin:.2f} |", flush=True)
        return
    print(f"V = {args.vocab}, {args.threads} threads, torch {torch.__version__}, {args.calls} alternating calls per cell")
    print()
    print("| config | B | sampler ms (median) | softmax ms (median) | ratio (median) | sampler ms (min) | softmax ms (min) | ratio (min) |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for B in [int(b) for b in args.batches.split(",")]:
            for name, b, t, s, tmin, smin in measure(B, args.vocab, args.calls, sampler):
                print(f"| {name} | {b} | {t:.2f} | {s:.2f} | {t / s:.2f}x | {tmin:.2f} | {smin:.2f} | {tmin / smin:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
