"""Prefix caching on the default model (CPU): the same workloads with and without it, alternating in
one process; prints the BENCHMARKS.md table ("Prefix caching").

    python benchmarks/prefix_cache.py [--threads 2] [--repeats 2] [--prefix 900] [--requests 32]

Workloads (greedy, ignore_eos, all requests submitted at once to a fresh engine per run):
- shared prefix: ``--requests`` requests whose prompts are one ``--prefix``-token prefix (seeded
  random ids) plus 8 tokens of their own, alternating between the base model and a DynMoLE bank
  (so two prefixes are cached: one per bank version), 8 new tokens each;
- loglikelihood (what lm-evaluation-harness sends): 8 questions x 4 choices, each request the
  question's ~300-token context plus its choice (~8 tokens), scored with prompt log-probabilities
  (echo + logprobs = 1) and one generated token dropped, as ``max_tokens: 0`` does over HTTP.
Outputs (tokens, or prompt log-probabilities to 1e-4) must be equal with and without caching.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adapters.runtime import BankRegistry  # noqa: E402
from benchmarks.banks import dynmole_bank  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.protocol import GenerationRequest, SamplingParams  # noqa: E402
from server.model import ensure_default_model, load_model  # noqa: E402


class Sink:
    def __init__(self):
        self.prefill = self.queries = self.hits = 0

    def on_step(self, s):
        self.prefill += s.num_prefill_tokens
        self.queries += s.prefix_cache_queries
        self.hits += s.prefix_cache_hits

    def on_request_finished(self, s):
        pass


def shared_prefix(n: int, prefix_len: int, vocab: int) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, vocab, (prefix_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"s{i}", prefix + torch.randint(100, vocab, (8,), generator=g).tolist(), params,
                              bank=None if i % 2 == 0 else "bank") for i in range(n)]


def loglikelihood(vocab: int, questions: int = 8, choices: int = 4) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=True)
    reqs = []
    for q in range(questions):
        context = torch.randint(100, vocab, (int(torch.randint(280, 320, (1,), generator=g)),), generator=g).tolist()
        for c in range(choices):
            choice = torch.randint(100, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            reqs.append(GenerationRequest(f"q{q}c{c}", context + choice, params))
    return reqs


def run(model, tokenizer, model_dir, registry, reqs, caching: bool):
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", kv_cache_memory=256 << 20, max_num_seqs=64,
                                    max_num_batched_tokens=512, enable_prefix_caching=caching),
                       model=model, tokenizer=tokenizer)
    engine.set_adapter_provider(registry)
    sink = Sink()
    engine.set_stats_sink(sink)
    fresh = [GenerationRequest(r.request_id, r.prompt_token_ids, r.params, bank=r.bank) for r in reqs]
    t0 = time.perf_counter()
    out = engine.generate(fresh)
    wall = time.perf_counter() - t0
    tokens = {rid: [t for e in evs for t in e.token_ids] for rid, evs in out.items()}
    prompt_lp = {rid: evs[0].prompt_logprobs for rid, evs in out.items()}
    return wall, sink, tokens, prompt_lp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=900)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model()
    model = load_model(model_dir)
    from server.engine.llm_engine import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    from adapters import BaseFingerprint

    registry = BankRegistry(model.config, dtype=torch.float16)  # the server's pool dtype on the CPU
    registry.add(dynmole_bank(BaseFingerprint.from_hf_config(model.config.raw), "bank", seed=1))
    vocab = model.config.vocab_size
    workloads = {
        f"{args.requests} requests, {args.prefix}-token shared prefix, base + bank alternating":
            shared_prefix(args.requests, args.prefix, vocab),
        "loglikelihood: 8 contexts x 4 choices, prompt logprobs": loglikelihood(vocab),
    }
    print("| workload | caching | wall s (runs) | prompt tokens computed | cache hits (tokens) | speed-up | outputs equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, reqs in workloads.items():
        walls = {False: [], True: []}
        result = {}
        for _ in range(args.repeats):
            for caching in (False, True):  # alternating, so machine load hits both alike
                wall, sink, tokens, plp = run(model, tokenizer, model_dir, registry, reqs, caching)
                walls[caching].append(wall)
                result[caching] = (sink, tokens, plp)
        (_, t_off, lp_off), (_, t_on, lp_on) = result[False], result[True]
        same = sum(t_off[r] == t_on[r] and (lp_off[r] is None or max(abs(a - b) for a, b in zip(lp_off[r], lp_on[r])) < 1e-4)
                   for r in t_off)
        for caching in (False, True):
            sink = result[caching][0]
            best = min(walls[caching])
            speed = min(walls[False]) / best
            print(f"| {name} | {'on' if caching else 'off'} | {best:.2f} ({', '.join(f'{w:.2f}' for w in walls[caching])}) "
                  f"| {sink.prefill} | {sink.hits} | {speed:.2f}x | {same}/{len(t_off)} |")


if __name__ == "__main__":
    main()
