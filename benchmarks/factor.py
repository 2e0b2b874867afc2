"""FactorLLM on the default model: calibration cost, FFN time, decode tokens/s, perplexity, accuracy.

    python benchmarks/factor.py [--calib-steps 40] [--limit 50] [--out runs/factor] [--reuse]
                                [--finetune-steps N] [--skip-speed]

Calibrates E=4/K=2, E=8/K=2 and E=8/K=4 together (one dense forward per step feeds all three) on
the shared commonsense *train* sets, then measures against the dense model:
- FFN time of one layer (layer 10): dense ``MLP.dense`` vs ``factor_mlp`` (routing + plan included);
- decode tokens/s: greedy decode over the simple KV cache, decode steps only (prefill excluded);
- perplexity on held-out text: the instruction + output of the first records of each shared
  *test* set, cut into 256-token windows;
- accuracy on the shared test sets (first ``--limit`` records of each): the log-likelihood of each
  choice's answer tokens after the Alpaca prompt and "the correct answer is ", highest wins.
With ``--finetune-steps N`` the K/E = 1/2 banks are also LM-fine-tuned (4 x 256-token train-set
sequences per step; ``adapters.factor.finetune``) and their quality measured as ``<name>-ft``.
Prints the markdown tables of BENCHMARKS.md and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters import BaseFingerprint, load_bank  # noqa: E402
from adapters.factor import FactorStep, factor_mlp, load_factor_weights  # noqa: E402
from adapters.factor.calibrate import FactorConfig, calibration_sequences, factorize, save_report  # noqa: E402
from server.model import SequenceKVCache, StepContext, ensure_default_model, load_model, step_context  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "commonsense"
SETS = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")
CONFIGS = ((4, 2), (8, 2), (8, 4))
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Response:\n")


def best_of(fn, repeats: int, inner: int) -> float:
    """Best mean seconds per call over ``repeats`` rounds of ``inner`` calls (the machine is shared)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


@torch.inference_mode()
def ffn_times(model, factors: dict, tokens: tuple[int, ...], layer: int = 10) -> dict:
    mlp = model.layers[layer].mlp
    out = {}
    with step_context(StepContext(positions=torch.zeros(1, dtype=torch.long), attention=None)):
        for t in tokens:
            x = torch.randn(t, model.config.hidden_size, generator=torch.Generator().manual_seed(t))
            out[("dense", t)] = best_of(lambda: mlp.dense(x), 7, 20)
            for name, fw in factors.items():
                out[(name, t)] = best_of(lambda: factor_mlp(x, mlp, fw.layers[layer]), 7, 20)
    return out


@torch.inference_mode()
def decode_rate(model, adapters, batch: int, prompt_len: int = 32, new_tokens: int = 16, repeats: int = 3) -> float:
    """Decode tokens/s (all sequences) over ``new_tokens`` greedy steps after a prefill, best of repeats."""
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for _ in range(repeats):
        cache = SequenceKVCache(model.config)
        seqs = list(range(batch))
        ids = torch.randint(100, 10000, (batch * prompt_len,), generator=gen)
        lens = [prompt_len] * batch
        elapsed = 0.0
        for i in range(new_tokens + 1):
            step = cache.step(seqs, lens)
            last = torch.tensor(lens).cumsum(0) - 1
            ctx = StepContext(positions=step.positions(), attention=step, logits_indices=last, adapters=adapters)
            t = time.perf_counter()
            with step_context(ctx):
                ids = model(ids).argmax(-1)
            if i:  # step 0 is the prefill
                elapsed += time.perf_counter() - t
            lens = [1] * batch
        best = max(best, batch * new_tokens / elapsed)
    return best


@torch.inference_mode()
def forward_rows(model, seqs: list[list[int]], adapters) -> torch.Tensor:
    """Log-probs [T, vocab] of every position of a flat batch of whole sequences."""
    cache = SequenceKVCache(model.config)
    step = cache.step(list(range(len(seqs))), [len(s) for s in seqs])
    ids = torch.tensor([t for s in seqs for t in s])
    with step_context(StepContext(positions=step.positions(), attention=step, adapters=adapters)):
        return torch.log_softmax(model(ids).float(), dim=-1)


def perplexity(model, windows: list[list[int]], adapters, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        logp = forward_rows(model, chunk, adapters)
        offset = 0
        for s in chunk:
            target = torch.tensor(s[1:])
            nll -= float(logp[offset:offset + len(s) - 1].gather(1, target[:, None]).sum())
            count += len(s) - 1
            offset += len(s)
    return float(torch.exp(torch.tensor(nll / count)))


def choice_items(tokenizer, limit: int) -> list[tuple[str, list[int], list[list[int]], int]]:
    """(set, prompt ids, per-choice answer ids, gold index) for the first ``limit`` records of each test set."""
    items = []
    for name in SETS:
        for r in json.loads((DATA / name / "test.json").read_text())[:limit]:
            fmt = re.search(r"Answer format: (.+)$", r["instruction"].strip())
            choices = [c.strip() for c in fmt.group(1).split("/")] if fmt else []
            if r["answer"] not in choices:
                continue
            prompt = PROMPT.format(instruction=r["instruction"]) + "the correct answer is"
            p_ids = tokenizer(prompt)["input_ids"]
            c_ids = [tokenizer(prompt + " " + c)["input_ids"][len(p_ids):] for c in choices]
            items.append((name, p_ids, c_ids, choices.index(r["answer"])))
    return items


def accuracy(model, items, adapters, batch: int = 8) -> dict[str, float]:
    """Per set: fraction of items whose gold choice has the highest summed log-likelihood."""
    seqs, owners = [], []
    for i, (_, p, cs, _) in enumerate(items):
        for j, c in enumerate(cs):
            seqs.append(p + c)
            owners.append((i, j, len(p), len(c)))
    scores: dict[tuple[int, int], float] = {}
    for s in range(0, len(seqs), batch):
        chunk = seqs[s:s + batch]
        logp = forward_rows(model, chunk, adapters)
        offset = 0
        for seq, (i, j, np_, nc) in zip(chunk, owners[s:s + batch]):
            rows = torch.arange(offset + np_ - 1, offset + np_ + nc - 1)
            scores[(i, j)] = float(logp[rows, torch.tensor(seq[np_:])].sum())
            offset += len(seq)
    hits: dict[str, list[bool]] = {}
    for i, (name, _, cs, gold) in enumerate(items):
        pred = max(range(len(cs)), key=lambda j: scores[(i, j)])
        hits.setdefault(name, []).append(pred == gold)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-steps", type=int, default=40)
    ap.add_argument("--tokens-per-step", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=50, help="test records per commonsense set for accuracy")
    ap.add_argument("--ppl-windows", type=int, default=16, help="256-token held-out windows for perplexity")
    ap.add_argument("--out", default=str(ROOT / "runs" / "factor"))
    ap.add_argument("--reuse", action="store_true", help="reuse banks already under --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="also LM-fine-tune the K/E = 1/2 banks' expert slices for N steps (banks <name>-ft, "
                    "reused with --reuse) and measure their quality")
    ap.add_argument("--finetune-lr", type=float, default=2e-4)
    ap.add_argument("--skip-speed", action="store_true", help="quality only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    path = ensure_default_model()
    model = load_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    base = BaseFingerprint.from_hf_config(model.config.raw)
    names = [f"factor-e{e}-k{k}" for e, k in CONFIGS]
    results: dict = {"calibration": {}}

    if not (args.reuse and all((out / n / "bank.json").is_file() for n in names)):
        seq_len = 256
        per_step = args.tokens_per_step // seq_len
        seqs = calibration_sequences(tok, sorted(DATA.glob("*/train.json")), seq_len,
                                     max_tokens=args.calib_steps * per_step * seq_len)
        cfgs = [FactorConfig(experts=e, top_k=k) for e, k in CONFIGS]
        for (bank, report), name in zip(factorize(model, base, seqs, cfgs, steps=args.calib_steps, seqs_per_step=per_step,
                                                  names=names, log=lambda s: print(s, flush=True)), names):
            bank.save(out / name)
            save_report(report, out / name)
    for name in names:
        results["calibration"][name] = json.loads((out / name / "calibration.json").read_text())
        results["calibration"][name].pop("history", None)
    factors = {n: load_factor_weights(load_bank(out / n, base=base), model) for n in names}
    print("calibration:", json.dumps(results["calibration"]), flush=True)

    tuned = {}
    if args.finetune_steps:
        from adapters.factor.finetune import finetune_factor_bank

        results["finetune"] = {}
        seqs = calibration_sequences(tok, sorted(DATA.glob("*/train.json")), 256, seed=1,
                                     max_tokens=args.finetune_steps * 4 * 256)
        for e, k in CONFIGS:
            if 2 * k != e:
                continue
            name = f"factor-e{e}-k{k}"
            folder = out / f"{name}-ft"
            if not (args.reuse and (folder / "finetune.json").is_file()):
                bank, report = finetune_factor_bank(model, load_bank(out / name, base=base), seqs,
                                                    steps=args.finetune_steps, seqs_per_step=4, lr=args.finetune_lr,
                                                    log=lambda s: print(name, s, flush=True))
                bank.save(folder)
                (folder / "finetune.json").write_text(json.dumps(report, indent=1) + "\n")
            report = json.loads((folder / "finetune.json").read_text())
            report.pop("loss", None)
            results["finetune"][f"{name}-ft"] = report
            tuned[f"{name}-ft"] = load_factor_weights(load_bank(folder, base=base), model)
        print("finetune:", json.dumps(results["finetune"]), flush=True)

    model.pack_weights()  # as the serving engine does: the dense GEMMs on packed weights (CPU fp32)
    variants = {"dense": None, **{n: FactorStep(fw) for n, fw in factors.items()}}
    if not args.skip_speed:
        times = ffn_times(model, factors, (1, 32))
        results["ffn_us"] = {f"{k[0]}@T={k[1]}": round(v * 1e6) for k, v in times.items()}
        print("ffn:", results["ffn_us"], flush=True)
        results["decode_tok_s"] = {}
        for batch in (1, 8):
            for name, step in variants.items():
                results["decode_tok_s"][f"{name}@B={batch}"] = round(decode_rate(model, step, batch), 1)
        print("decode:", results["decode_tok_s"], flush=True)
    variants.update({n: FactorStep(fw) for n, fw in tuned.items()})

    held = []
    for name in SETS:
        for r in json.loads((DATA / name / "test.json").read_text())[-200:]:  # the last records: disjoint from --limit
            held += tok(r["instruction"] + "\n" + r["output"])["input_ids"] + [tok.eos_token_id]
    windows = [held[i:i + 256] for i in range(0, len(held) - 255, 256)][:args.ppl_windows]
    items = choice_items(tok, args.limit)
    results["perplexity"], results["accuracy"] = {}, {}
    for name, step in variants.items():
        results["perplexity"][name] = round(perplexity(model, windows, step), 3)
        results["accuracy"][name] = {k: round(v, 3) for k, v in accuracy(model, items, step).items()}
        print(name, results["perplexity"][name], results["accuracy"][name], flush=True)
    results["setup"] = {"ppl_tokens": sum(len(w) for w in windows), "accuracy_items": len(items), "limit": args.limit,
                        "threads": args.threads}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results, names)
    return 0


def print_tables(r: dict, names: list[str]) -> None:
    dense_acc = r["accuracy"]["dense"]
    ffn, dec = r.get("ffn_us", {}), r.get("decode_tok_s", {})

    def cell(table: dict, key: str, dense_key: str, faster_is_smaller: bool) -> str:
        if key not in table:
            return "-"
        v, d = table[key], table[dense_key]
        if key == dense_key:
            return f"{v:,}"
        return f"{v:,} ({(d / v if faster_is_smaller else v / d):.2f}x)"

    print("\n| model | FFN us T=1 | FFN us T=32 | decode tok/s B=1 | B=8 | ppl | " + " | ".join(SETS)
          + " | avg acc | retention |")
    print("|---|---|---|---|---|---|" + "---|" * len(SETS) + "---|---|")
    for name in r["accuracy"]:
        acc = r["accuracy"][name]
        avg = sum(acc.values()) / len(acc)
        dense_avg = sum(dense_acc.values()) / len(dense_acc)
        speed = name.removesuffix("-ft")  # a fine-tuned bank runs the same kernels as its source
        print(f"| {name} | {cell(ffn, f'{speed}@T=1', 'dense@T=1', True)} | {cell(ffn, f'{speed}@T=32', 'dense@T=32', True)} | "
              f"{cell(dec, f'{speed}@B=1', 'dense@B=1', False)} | {cell(dec, f'{speed}@B=8', 'dense@B=8', False)} | "
              f"{r['perplexity'][name]} | " + " | ".join(f"{acc.get(s, 0):.2f}" for s in SETS) +
              f" | {avg:.3f} | {avg / dense_avg:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
