"""One long prompt among running streams: the scheduler's long-prefill cap, before vs after (CPU).

    python benchmarks/long_prefill.py [--threads 2] [--prompt-len 8000] [--streams 4] [--repeats 2]

Workload, on the default model: ``--streams`` requests decode (short prompts, greedy, ignore_eos);
then a ``--prompt-len`` prompt arrives, and right after it a short request (a 2-token prompt, 2 new
tokens). The engine is stepped until the long prompt has its first token. Measured per policy:
the worst gap between two tokens of a running stream while the long prompt prefilled, and the
short request's wait (arrival to its last token). Policies, alternated in one process on one engine
(the scheduler's cap is switched between runs), so machine load hits them alike:
- before: no cap (``--long-prefill-token-threshold 0``): the long prompt's chunk takes the budget;
- after: the default cap (a quarter of ``--max-num-batched-tokens``), decodes first.
Prints the BENCHMARKS.md table (each policy's best run of ``--repeats``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def run(engine, cap: int, prompt_len: int, streams: int, tag: str) -> tuple[float, float, int]:
    """(worst stream gap s, short request's wait s, steps) with the scheduler's cap set to ``cap``."""
    from server.engine.protocol import GenerationRequest, SamplingParams

    engine.scheduler.long_prefill_token_threshold = cap
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    ids = lambda n: torch.randint(100, vocab, (n,), generator=g).tolist()  # noqa: E731
    stream = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        engine.add_request(GenerationRequest(f"{tag}-s{i}", ids(16), stream))
    while any(engine.sequences[f"{tag}-s{i}"][0].num_output_tokens < 2 for i in range(streams)):
        engine.step()  # every stream decodes before the long prompt arrives
    last = {f"{tag}-s{i}": time.monotonic() for i in range(streams)}
    engine.add_request(GenerationRequest(f"{tag}-long", ids(prompt_len), SamplingParams(max_tokens=1, ignore_eos=True)))
    arrival = time.monotonic()
    engine.add_request(GenerationRequest(f"{tag}-short", ids(2), SamplingParams(max_tokens=2, ignore_eos=True)))
    worst, wait, steps, long_done = 0.0, None, 0, False
    while not long_done or wait is None:
        events = engine.step()
        steps += 1
        now = time.monotonic()
        for e in events:
            if e.request_id in last and e.token_ids and not long_done:
                worst = max(worst, now - last[e.request_id])
                last[e.request_id] = now
            if e.request_id == f"{tag}-short" and e.finished:
                wait = now - arrival
            if e.request_id == f"{tag}-long" and e.finished:
                long_done = True
    for rid in list(engine.sequences):
        engine.abort(rid)
    return worst, wait, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.model import ensure_default_model

    config = EngineConfig(model=ensure_default_model(), device="cpu", dtype="float32", kv_cache_memory=1 << 30,
                          max_num_seqs=16, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine(config)
    cap = config.resolved_long_prefill_token_threshold()
    run(engine, cap, 64, 1, "warm")  # kernel build, allocator
    best: dict[str, tuple[float, float, int]] = {}
    for r in range(args.repeats):
        for name, c in (("before (no cap)", 0), (f"after (cap {cap})", cap)):
            got = run(engine, c, args.prompt_len, args.streams, f"r{r}-{c}")
            print(f"# run {r} {name}: worst gap {got[0]:.2f} s, short wait {got[1]:.2f} s, {got[2]} steps", flush=True)
            if name not in best or got[1] < best[name][1]:
                best[name] = got
    print(f"\ntorch {torch.__version__}, {args.threads} threads, default model fp32, max_num_batched_tokens "
          f"{args.max_num_batched_tokens}, {args.streams} decoding streams, a {args.prompt_len}-token prompt, then a "
          f"2-token request (2 new tokens)\n")
    print("| policy | worst inter-token gap of a running stream | short request's wait | steps until the long prompt's first token |")
    print("|---|---|---|---|")
    for name, (worst, wait, steps) in best.items():
        print(f"| {name} | {worst:.2f} s | {wait:.2f} s | {steps} |")


if __name__ == "__main__":
    main()
