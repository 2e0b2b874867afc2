"""Simulation: routing requests for many banks over many replicas, bank affinity vs round-robin.

Each replica keeps at most ``--resident`` banks loaded (LRU; loading one that is missing is a
miss, which costs a load from host memory or disk) and runs at most ``--slots`` requests at once
(more wait in its queue). Requests arrive as a Poisson stream; a request's bank follows a Zipf
popularity law over ``--banks`` banks; a request runs ``--duration`` steps.

Policies:
- round-robin: the next replica in turn (what a plain Service / load balancer does);
- least-loaded: the replica with the fewest requests (the picker's queue scorer alone);
- affinity: the picker's LoRA-affinity scorer plus its queue scorer (1.0 the bank is resident,
  0.8 there is room for one more bank, 0 full; ties and the rest by load), which is also what Ray
  Serve's multiplexed routing does (replicas holding the model first, while they have room).

Reported: hit rate (the bank was resident on the replica that got the request), load spread
(mean over time of the busiest replica's load over the mean load), mean queueing delay (steps),
and distinct banks per replica-step (each costs the step one router GEMM and one routed-LoRA call
per linear, so fewer is cheaper).

    python benchmarks/bank_affinity.py            # the table in docs/scale-out.md
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict, deque


class Replica:
    def __init__(self, resident: int, slots: int):
        self.resident_cap, self.slots = resident, slots
        self.banks: OrderedDict[int, None] = OrderedDict()  # LRU of loaded banks
        self.running: list[tuple[int, int]] = []  # (bank, steps left)
        self.queue: deque[tuple[int, int]] = deque()  # (bank, arrival step)

    @property
    def load(self) -> int:
        return len(self.running) + len(self.queue)

    def touch(self, bank: int) -> bool:
        """Make ``bank`` resident (evicting the least recently used idle bank); True on a hit."""
        if bank in self.banks:
            self.banks.move_to_end(bank)
            return True
        in_use = {b for b, _ in self.running}
        while len(self.banks) >= self.resident_cap:
            victim = next((b for b in self.banks if b not in in_use), None)
            if victim is None:
                break  # every resident bank is in use: grow past the budget for this step
            del self.banks[victim]
        self.banks[bank] = None
        return False


def score_affinity(r: Replica, bank: int) -> float:
    waiting = {b for b, _ in r.queue}
    active = {b for b, _ in r.running}
    if bank in r.banks:
        return 1.0
    if len(active) + len(waiting) < r.resident_cap:
        return 0.8
    if bank in waiting:
        return 0.6
    return 0.0


def simulate(policy: str, *, replicas: int, banks: int, resident: int, slots: int, rate: float,
             duration: int, steps: int, zipf: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** zipf for i in range(banks)]
    reps = [Replica(resident, slots) for _ in range(replicas)]
    rr = 0
    hits = total = 0
    waits: list[int] = []
    spread, banks_per_step, busy = 0.0, 0.0, 0
    for t in range(steps):
        for _ in range(_poisson(rng, rate)):
            bank = rng.choices(range(banks), weights)[0]
            if policy == "round-robin":
                r = reps[rr % replicas]
                rr += 1
            elif policy == "least-loaded":
                r = min(reps, key=lambda x: (x.load, rng.random()))
            else:  # affinity: weighted like the picker's default profile (affinity 3, queue 2)
                r = max(reps, key=lambda x: (3 * score_affinity(x, bank) + 2 * (1 - min(x.load / (2 * slots), 1)),
                                             rng.random()))
            r.queue.append((bank, t))
        loads = []
        for r in reps:
            r.running = [(b, left - 1) for b, left in r.running if left > 1]
            while r.queue and len(r.running) < slots:
                bank, arrived = r.queue.popleft()
                hits += r.touch(bank)
                total += 1
                waits.append(t - arrived)
                r.running.append((bank, duration))
            loads.append(r.load)
            if r.running:
                banks_per_step += len({b for b, _ in r.running})
                busy += 1
        mean = sum(loads) / len(loads)
        if mean > 0:
            spread += max(loads) / mean
    return {"hit_rate": hits / max(total, 1), "spread": spread / steps, "wait": sum(waits) / max(len(waits), 1),
            "banks_per_step": banks_per_step / max(busy, 1), "requests": total}


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method; lam is small per step
    import math

    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--banks", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--resident", type=int, default=8, help="banks a replica keeps loaded (max_lora)")
    ap.add_argument("--slots", type=int, default=16, help="requests a replica runs at once (max_num_seqs)")
    ap.add_argument("--utilisation", type=float, default=0.7, help="offered load / capacity")
    ap.add_argument("--duration", type=int, default=20, help="steps a request runs")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| replicas | banks | policy | hit rate | load spread (max/mean) | mean wait (steps) | banks per replica-step |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n in args.replicas:
        for b in args.banks:
            rate = args.utilisation * n * args.slots / args.duration
            for policy in ("round-robin", "least-loaded", "affinity"):
                r = simulate(policy, replicas=n, banks=b, resident=args.resident, slots=args.slots, rate=rate,
                             duration=args.duration, steps=args.steps, zipf=args.zipf, seed=args.seed)
                print(f"| {n} | {b} | {policy} | {r['hit_rate']:.3f} | {r['spread']:.2f} | {r['wait']:.2f} | "
                      f"{r['banks_per_step']:.2f} |")


if __name__ == "__main__":
    main()
