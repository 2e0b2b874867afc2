"""What the adapter runtime reports about routing, once per step, in ``StepStats.routing``.

The runtime aggregates on the device as it routes (a few ``bincount`` / ``bucketize`` per routed
linear) and hands over counts; the metrics layer (server/metrics.py) turns them into Prometheus
series after the step. Nothing here is called per token or per layer from Python.

Counts may be ``torch.Tensor`` (any device; read once per step) or plain sequences of numbers.
Terms: a *decision* is one token at one routed site (one (layer, target) router for DynMoLE / MoLA,
one layer's FFN router for MixLoRA, ``target="mlp"``). A token of a bank with 2 layers x 4 routed
targets makes 8 decisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of the routing-entropy buckets. Entropy is normalised: the Shannon entropy of the
# router's softmax divided by log(num_experts), so 0 = certain, 1 = uniform, comparable across banks.
# ``entropy_counts`` has len(ENTROPY_BUCKETS) + 1 entries, the last one for values above 1.0 (none).
ENTROPY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

Counts = Sequence[int] | Sequence[float] | Any  # a 1-D list / tuple / torch.Tensor of counts


class SiteCounts(Mapping):
    """``BankRoutingStats.selections`` as blocks of rows: ``blocks`` = [(sites, counts [len(sites), n])].
    A read-only mapping (layer, target) -> counts [n] like the plain dict, which consumers that take a
    whole step at once (the Prometheus sink) read block by block instead of site by site."""

    def __init__(self, blocks: list[tuple[tuple[tuple[int, str], ...], Any]]):
        self.blocks = blocks
        self._index: dict[tuple[int, str], tuple[int, int]] | None = None

    def _where(self) -> dict[tuple[int, str], tuple[int, int]]:
        if self._index is None:
            self._index = {site: (b, i) for b, (sites, _) in enumerate(self.blocks) for i, site in enumerate(sites)}
        return self._index

    def __getitem__(self, site: tuple[int, str]) -> Any:
        b, i = self._where()[site]
        return self.blocks[b][1][i]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._where())

    def __len__(self) -> int:
        return len(self._where())


@dataclass
class BankRoutingStats:
    """One bank's routing in one step.

    ``selections``: (layer, target) -> counts of shape [num_experts]: how many of the step's decisions
        at that site selected each expert (a broadcast decision selects every expert). A dict, or a
        ``SiteCounts`` (the same mapping, stored as blocks of rows).
    ``tokens``: tokens of this bank in the step (counted once, not per site).
    ``decisions``: token x site decisions in the step.
    ``broadcast``: decisions that broadcast to all experts (DynMoLE's high-entropy case; 0 otherwise).
    ``experts_per_decision``: counts of shape [max_k + 1]; entry k = decisions that used k experts.
    ``entropy_counts``: counts of shape [len(ENTROPY_BUCKETS) + 1] (non-cumulative) of normalised
        router entropy per decision; ``entropy_sum`` the sum of those entropies. Empty for plain LoRA.
    """

    tokens: int = 0
    decisions: int = 0
    broadcast: int = 0
    selections: Mapping[tuple[int, str], Counts] = field(default_factory=dict)
    experts_per_decision: Counts = ()
    entropy_counts: Counts = ()
    entropy_sum: float = 0.0


@dataclass
class RoutingStats:
    """All banks' routing in one step, plus the expert pool's occupancy.

    ``banks``: bank name -> its stats (only banks with tokens in the step).
    ``pool_slots_used`` / ``pool_slots_total``: slots of the device pool that holds loaded banks'
        expert weights (None: the runtime has no pool).
    """

    banks: dict[str, BankRoutingStats] = field(default_factory=dict)
    pool_slots_used: int | None = None
    pool_slots_total: int | None = None


def entropy_bucket_counts(entropy: Any) -> Any:
    """Counts of shape [len(ENTROPY_BUCKETS) + 1] for a 1-D tensor of normalised entropies [D]."""
    import torch

    edges = torch.tensor(ENTROPY_BUCKETS, dtype=entropy.dtype, device=entropy.device)
    idx = torch.bucketize(entropy, edges)  # value <= edge[i] -> i
    return torch.bincount(idx, minlength=len(ENTROPY_BUCKETS) + 1)


def add_bank_stats(routing: RoutingStats | None, extra: Mapping[str | None, BankRoutingStats] | None
                   ) -> RoutingStats | None:
    """``routing`` with ``extra`` banks' stats added (the visual mixture's, reported outside the
    adapter step); a bank in both gets the sum. Key None: the served model's own (metrics label:
    the model's name)."""
    if not extra:
        return routing
    import torch

    def add(x: Any, y: Any) -> Any:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.numel() == 0 or y.numel() == 0:
            return x if y.numel() == 0 else y
        n = max(x.numel(), y.numel())
        return torch.nn.functional.pad(x, (0, n - x.numel())) + torch.nn.functional.pad(y, (0, n - y.numel()))

    routing = routing if routing is not None else RoutingStats()
    for bank, b in extra.items():
        a = routing.banks.get(bank)
        if a is not None:
            sel = dict(a.selections)
            for k, v in b.selections.items():
                sel[k] = add(sel[k], v) if k in sel else v
            b = BankRoutingStats(tokens=a.tokens + b.tokens, decisions=a.decisions + b.decisions,
                                 broadcast=a.broadcast + b.broadcast, selections=sel,
                                 experts_per_decision=add(a.experts_per_decision, b.experts_per_decision),
                                 entropy_counts=add(a.entropy_counts, b.entropy_counts),
                                 entropy_sum=a.entropy_sum + b.entropy_sum)
        routing.banks[bank] = b
    return routing
