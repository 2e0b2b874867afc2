"""Structured outputs: the per-step cost of grammar masks at 32 concurrent requests, on the default
model (SmolLM2-135M-Instruct), engine driven directly (no HTTP).

    python benchmarks/structured_output.py [--rounds 3] [--steps 24] [--threads 2]

Table 1: mean decode-step time with 32 running requests, without a constraint and with every
request under one JSON schema (compiled once), rounds alternating the two in one process; the
overhead column is schema / plain - 1. The constrained step also reports its mask share: the
bitmask fill (llguidance, all 32 rows in one call) and its application to the logits.
Table 2: the two grammar engines on the same tokenizer and schema (why llguidance): compile, and
the per-step mask fill for 32 matchers walking a valid 40-token JSON value (xgrammar only if
installed: pip install xgrammar).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from server.engine import sampler as sampler_module  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.protocol import GenerationRequest, SamplingParams, StructuredOutput  # noqa: E402
from server.engine.structured_output import as_json_text  # noqa: E402
from server.model import ensure_default_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 60, "maxLength": 400},
    "year": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "year", "tags"], "additionalProperties": False}
N = 32


def prompts(tok) -> list[list[int]]:
    topics = ["a film", "a book", "a song", "a city", "a painting", "a game", "a recipe", "a river"]
    out = []
    for i in range(N):
        msg = [{"role": "user", "content": f"Describe {topics[i % 8]} number {i} as JSON with a long title."}]
        text = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


class MaskTimer:
    """Wraps the sampler module's fill / apply to time them inside the real step."""

    def __init__(self):
        self.fill = self.apply = 0.0
        self._fill, self._apply = sampler_module.fill_bitmask, sampler_module.apply_bitmask

        def fill(*a, **k):
            t = time.perf_counter()
            try:
                return self._fill(*a, **k)
            finally:
                self.fill += time.perf_counter() - t

        def apply(*a, **k):
            t = time.perf_counter()
            try:
                return self._apply(*a, **k)
            finally:
                self.apply += time.perf_counter() - t

        sampler_module.fill_bitmask, sampler_module.apply_bitmask = fill, apply


def run_round(engine: LLMEngine, ids: list[list[int]], spec, steps: int, tag: str, timer: MaskTimer):
    for i, p in enumerate(ids):
        engine.add_request(GenerationRequest(f"{tag}-{i}", p, SamplingParams(
            max_tokens=steps + 8, temperature=0.0, ignore_eos=True, structured=spec)))
    while any(s.num_computed_tokens < s.num_prompt_tokens for seqs in engine.sequences.values() for s in seqs):
        engine.step()  # prefill (not measured)
    times = []
    timer.fill = timer.apply = 0.0
    for _ in range(steps):
        if engine.num_running != N:
            raise RuntimeError(f"a request ended early ({engine.num_running} running): raise minLength")
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    mask = (timer.fill / steps, timer.apply / steps)
    for rid in list(engine.sequences):
        engine.abort(rid)
    return statistics.mean(times), mask


def backends(tok, vocab: int) -> list[tuple[str, float, float]]:
    value = json.dumps({"title": "An example title that is long enough to pass sixty chars easily", "year": 1999,
                        "tags": ["a", "b"]})
    tokens = tok(value, add_special_tokens=False)["input_ids"]
    rows = []
    import llguidance  # noqa: PLC0415
    import llguidance.hf  # noqa: PLC0415
    import llguidance.torch as lt  # noqa: PLC0415

    lt_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    template = llguidance.LLMatcher(lt_tok, grammar)
    compile_s = time.perf_counter() - t
    ex = llguidance.LLExecutor(1)
    ms = [template.deep_copy() for _ in range(N)]
    mask = lt.allocate_token_bitmask(N, vocab)
    fill = 0.0
    for tid in tokens:
        t = time.perf_counter()
        lt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], mask)
        fill += time.perf_counter() - t
        for m in ms:
            m.consume_token(tid)
    rows.append(("llguidance", compile_s, fill / len(tokens)))
    try:
        import xgrammar as xgr  # noqa: PLC0415
    except ImportError:
        return rows
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t
    ms = [xgr.GrammarMatcher(compiled) for _ in range(N)]
    batch = xgr.BatchGrammarMatcher(1)
    mask = xgr.allocate_token_bitmask(N, vocab)
    fill = 0.0
    for tid in tokens:
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask(ms, mask)
        fill += time.perf_counter() - t
        for m in ms:
            m.accept_token(tid)
    rows.append(("xgrammar", compile_s, fill / len(tokens)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=ensure_default_model(), device="cpu", max_num_seqs=N,
                                    max_num_batched_tokens=2048, max_model_len=1024))
    tok = engine.tokenizer
    ids = prompts(tok)
    spec = StructuredOutput("json", as_json_text(SCHEMA))
    timer = MaskTimer()
    run_round(engine, ids, spec, 2, "warm-s", timer)
    run_round(engine, ids, None, 2, "warm-p", timer)
    plain, schema, fills, applies = [], [], [], []
    for r in range(args.rounds):
        plain.append(run_round(engine, ids, None, args.steps, f"p{r}", timer)[0])
        t, (fill, apply) = run_round(engine, ids, spec, args.steps, f"s{r}", timer)
        print(f"round {r}: plain {plain[-1] * 1e3:.1f} ms/step, schema {t * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
        schema.append(t)
        fills.append(fill)
        applies.append(apply)
    p, s = statistics.median(plain), statistics.median(schema)
    print(f"decode step, {N} running requests, {args.steps} steps x {args.rounds} rounds (median of round means)")
    print("| requests | plain ms/step | JSON schema ms/step | overhead | mask fill ms | mask apply ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {N} | {p * 1e3:.1f} | {s * 1e3:.1f} | {100 * (s / p - 1):+.1f}% | "
          f"{statistics.median(fills) * 1e3:.2f} | {statistics.median(applies) * 1e3:.2f} |")
    print()
    print("| grammar engine | compile ms (this schema) | mask fill ms / step, 32 rows, 1 thread |")
    print("| --- | --- | --- |")
    for name, c, f in backends(tok, engine.model_config.vocab_size):
        print(f"| {name} | {c * 1e3:.1f} | {f * 1e3:.2f} |")


if __name__ == "__main__":
    main()
