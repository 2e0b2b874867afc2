"""Quality of each base-weight quantization on the embedded default: perplexity and log-likelihood
accuracy on the shared commonsense sets; prints the BENCHMARKS.md table ("Quantized base: quality").

    python benchmarks/quant_quality.py [--modes none int8 int4] [--limit 100] [--ppl-seqs 16] [--threads 2]

- perplexity: next-token perplexity of our model's full forward over ``--ppl-seqs`` windows of 512
  tokens cut from the shared sets' training text (instruction + output, in file order);
- accuracy: ``adapters.evaluate`` in loglik mode through the serving engine (the most likely answer
  label from the prompt's log-probabilities), the first ``--limit`` test items of each set.
``int4`` on the embedded default is its GGUF's Q4_1 blocks as stored (the server's default, auto);
``none`` is the fp32 folder transformers expanded from the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"  # --data: elsewhere (a worktree)
SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
WINDOW = 512


def ppl_windows(tokenizer, n: int, data: Path) -> list[torch.Tensor]:
    ids: list[int] = []
    for name in SETS:
        for rec in json.loads((data / name / "train.json").read_text())[:400]:
            ids += tokenizer(f"{rec['instruction']}\n{rec['output']}\n\n")["input_ids"]
    return [torch.tensor(ids[i * WINDOW:(i + 1) * WINDOW]) for i in range(min(n, len(ids) // WINDOW))]


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    from server.model import SequenceKVCache, StepContext, step_context

    nll, count = 0.0, 0
    for w in windows:
        cache = SequenceKVCache(model.config)
        step = cache.step([0], [len(w)])
        with step_context(StepContext(positions=step.positions(), attention=step)):
            logits = model(w).float()
        nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ppl-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA, help="the shared commonsense sets' folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from adapters.evaluate import EngineGenerator, evaluate_set, load_eval_set
    from server.model import ensure_default_model, load_model

    folder = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = ppl_windows(tokenizer, args.ppl_seqs, args.data)
    rows = []
    for mode in args.modes:
        t0 = time.perf_counter()
        model = load_model(folder, quantization=mode)
        ppl = perplexity(model, windows)
        scorer = EngineGenerator(model, tokenizer, model_path=str(folder), max_num_seqs=16)
        accs, total = [], 0
        for name in SETS:
            items = load_eval_set(args.data / name / "test.json", args.limit)
            r = evaluate_set(name, items, tokenizer, mode="loglik", generator=scorer, scorer=scorer)
            accs.append(r.accuracy)
            total += r.n
        rows.append((mode, ppl, accs, total, time.perf_counter() - t0))
        print(f"  {mode}: ppl {ppl:.3f}, accuracy {[round(100 * a, 1) for a in accs]}", flush=True)
        del model, scorer

    print(f"\nperplexity: {len(windows)} windows x {WINDOW} tokens of the shared sets' training text; accuracy: "
          f"loglik mode through the engine, first {args.limit} test items per set\n")
    print("| base weights | perplexity | " + " | ".join(SETS) + " | mean accuracy |")
    print("|---" * (3 + len(SETS)) + "|")
    for mode, ppl, accs, total, _ in rows:
        print(f"| {mode} | {ppl:.3f} | " + " | ".join(f"{100 * a:.1f}%" for a in accs)
              + f" | {100 * sum(accs) / len(accs):.1f}% ({total} items) |")


if __name__ == "__main__":
    main()
