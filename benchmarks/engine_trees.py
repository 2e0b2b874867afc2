"""The in-process engine of two source trees, side by side: ``moleserve serve``'s engine (built from
the same flags as ``benchmarks/served.py``'s, int4 base by default) in one process per tree and
round, trees alternating (their order flips every round), each process timing ``--repeats`` runs
of 32 requests x 64 greedy tokens on the short workload's prompts (each run its own first token, so
no run reads another's prefix cache). For a change below the HTTP layer (a kernel, the scheduler):
``served.py --baseline-tree`` compares the servers, with the HTTP path's own spread on top.

    python benchmarks/engine_trees.py --baseline-tree <a worktree of the commit before>
        [--rounds 4] [--repeats 3] [--concurrency 32] [--new-tokens 64]

Prints each round's tok/s per tree, then best and median per tree and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
tree, repeats, conc, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree); sys.path.insert(1, tree + "/benchmarks")
import torch
torch.set_num_threads(2)
import served
eng = served.in_process_engine(served.serve_flags(conc, []))
prompts = served.prompts_for(conc, 49152, 30, 44, 0)
served.in_process(eng, served.own_prompts(prompts, 99)[:8], 8)  # warm-up
first = time.monotonic_ns() % 50
print(json.dumps([conc * new / served.in_process(eng, served.own_prompts(prompts, first + r), new)
                  for r in range(repeats)]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-tree", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    trees = {"this tree": HERE.parent, "baseline": args.baseline_tree.resolve()}
    runs: dict[str, list[float]] = {k: [] for k in trees}
    for rnd in range(args.rounds):
        for name in (list(trees) if rnd % 2 == 0 else list(trees)[::-1]):
            out = subprocess.run([sys.executable, "-c", CHILD, str(trees[name]), str(args.repeats),
                                  str(args.concurrency), str(args.new_tokens)],
                                 capture_output=True, text=True, check=True, cwd="/tmp")
            tps = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name] += tps
            print(f"round {rnd + 1} {name}: " + ", ".join(f"{v:.1f}" for v in tps), flush=True)
    a, b = runs["this tree"], runs["baseline"]
    print("\n| tree | tok/s best | median | runs |\n|---|---|---|---|")
    for name, v in runs.items():
        print(f"| {name} | {max(v):.1f} | {statistics.median(v):.1f} | {len(v)} |")
    print(f"\nthis tree / baseline: best {max(a) / max(b):.3f}, median {statistics.median(a) / statistics.median(b):.3f}")


if __name__ == "__main__":
    main()
