"""Train lora / mixlora / dynmole banks on the shared commonsense train sets and evaluate each (and
the base model) on the four test sets; prints the table of BENCHMARKS.md ("Trainer and evaluator").

    python benchmarks/train_eval.py --train-limit 96 --eval-limit 25 --out runs/train_eval

Everything is seeded; trained banks, logs and the JSON report go under --out (git-ignored runs/).
The lora rank is chosen so its trainable parameters match dynmole's (same targets, + routers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "commonsense"
SETS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(ROOT / "runs" / "train_eval"))
    ap.add_argument("--kinds", default="lora,mixlora,dynmole")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-limit", type=int, default=1000, help="records drawn (seeded) from the union of the train sets")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=100, help="first N items of each test set")
    ap.add_argument("--modes", default="loglik", help="comma-separated: loglik,generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from adapters import BaseFingerprint, load_bank
    from adapters.evaluate import LocalRunner, evaluate_set, load_eval_set
    from adapters.train import TrainConfig, load_examples, train
    from server.commands.common import resolve_model_path
    from server.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model_path(args.model)
    model, tok = load_model(path), AutoTokenizer.from_pretrained(path)
    base = BaseFingerprint.from_hf_config(model.config.raw)
    train_files = [str(DATA / s / "train.json") for s in SETS]
    examples = load_examples(train_files, tok, cutoff=args.cutoff, limit=args.train_limit, seed=args.seed)
    test_sets = {s: load_eval_set(DATA / s / "test.json", args.eval_limit) for s in SETS}
    modes = args.modes.split(",")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["setup"] = {k: v for k, v in vars(args).items()} | {"train_examples": len(examples),
                                                               "train_tokens": sum(len(e.input_ids) for e in examples)}

    def evaluate(row: str, bank) -> None:
        runner = LocalRunner(model, bank, batch_size=8)
        for mode in modes:
            key = f"{row}/{mode}"
            if key in report:
                continue
            t0 = time.perf_counter()
            res = {s: evaluate_set(s, items, tok, mode=mode, generator=runner, scorer=runner).accuracy
                   for s, items in test_sets.items()}
            report[key] = {"sets": res, "average": sum(res.values()) / len(res), "seconds": time.perf_counter() - t0}
            report_path.write_text(json.dumps(report, indent=1))
            print(key, report[key], flush=True)

    evaluate("base", None)
    kinds = args.kinds.split(",")
    dyn_params = args.experts * args.rank * sum(sum(base.linear_shape(t)) for t in ("gate_proj", "up_proj", "down_proj"))
    dyn_params += args.experts * sum(base.linear_shape(t)[0] for t in ("gate_proj", "up_proj", "down_proj"))
    for kind in kinds:
        rank = args.rank
        if kind == "lora":  # match dynmole's trainable parameters per layer
            rank = round(dyn_params / sum(sum(base.linear_shape(t)) for t in ("gate_proj", "up_proj", "down_proj")))
        cfg = TrainConfig(data=train_files, out=str(out / kind), model=args.model, kind=kind, experts=args.experts,
                          rank=rank, lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                          epochs=args.epochs, cutoff=args.cutoff, limit=args.train_limit, seed=args.seed,
                          threads=args.threads, progress=False)
        if f"train/{kind}" not in report:
            t0 = time.perf_counter()
            result = train(cfg, tokenizer=tok, model=model, examples=examples)
            report[f"train/{kind}"] = {"seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
                                       "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
                                       "trainable_params": result.trainable_params, "rank": rank,
                                       "steps": result.steps, "final_loss": result.history[-1]["loss"]}
            report_path.write_text(json.dumps(report, indent=1))
            print(f"train/{kind}", report[f"train/{kind}"], flush=True)
        evaluate(kind, load_bank(out / kind, base=base))

    print(table(report, ["base", *kinds], modes))
    return 0


def table(report: dict, rows: list[str], modes: list[str]) -> str:
    lines = ["| bank | mode | " + " | ".join(SETS) + " | average | trainable params | train s | tokens/s |",
             "|---|---|" + "---:|" * (len(SETS) + 4)]
    for row in rows:
        tr = report.get(f"train/{row}", {})
        for mode in modes:
            r = report.get(f"{row}/{mode}")
            if r is None:
                continue
            cells = " | ".join(f"{100 * r['sets'][s]:.1f}" for s in SETS)
            lines.append(f"| {row} | {mode} | {cells} | {100 * r['average']:.1f} | "
                         f"{tr.get('trainable_params', 0):,} | {tr.get('train_seconds', 0):.0f} | "
                         f"{tr.get('tokens_per_s', 0):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
