"""How a bank's routers turn logits into expert weights: one typed config per bank."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import BankError

STRATEGIES = ("none", "topk", "topp", "dynmole")
ENTROPY_TYPES = ("tsallis", "shannon", "renyi")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing parameters; ``docs/bank-format.md`` states each strategy's exact math.

    With p = softmax(router logits) in fp32 over a router's N experts:

    - ``none``: one expert, weight 1 (plain LoRA).
    - ``topk``: the ``top_k`` largest p, renormalised to sum 1 (MixLoRA, MoLA).
    - ``topp``: MoE-PEFT ``mixlora-dynamic``: p /= ``temperature`` when it is > 0; keep experts in
      descending order while the cumulative sum *before* them is <= ``top_p`` (the expert that
      crosses top_p is kept); weights p * mask, not renormalised.
    - ``dynmole``: DynMoLE hybrid routing (ALGORITHMS.md §2): keep while the cumulative sum
      *including* the expert is <= ``top_p``, always keep ``keep_top_k``, keep all when the
      normalised entropy > ``entropy_threshold``; weights p * mask, not renormalised.
    """

    strategy: str = "none"
    top_k: int = 2
    top_p: float = 0.75
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    entropy_index: float = 1.1  # q of the Tsallis entropy
    entropy_eps: float = 1e-5
    entropy_type: str = "tsallis"
    temperature: float = 0.0  # topp only; 0 leaves p as it is

    def __post_init__(self) -> None:
        def number(key: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
            if not ok:
                bound = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise BankError(f"routing.{key} must be a finite number in {bound}, got {value!r}")

        def count(key: str) -> None:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BankError(f"routing.{key} must be a positive integer, got {value!r}")

        if self.strategy not in STRATEGIES:
            raise BankError(f"routing.strategy {self.strategy!r} is unknown (known: {', '.join(STRATEGIES)})")
        count("top_k")
        count("keep_top_k")
        number("top_p", 0.0, 1.0, lo_open=True)
        number("entropy_threshold", 0.0)
        number("entropy_index", -math.inf)
        number("entropy_eps", 0.0, 1.0)
        number("temperature", 0.0)
        if self.entropy_type not in ENTROPY_TYPES:
            raise BankError(
                f"routing.entropy_type {self.entropy_type!r} is unknown (known: {', '.join(ENTROPY_TYPES)})"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> "RoutingConfig":
        if not isinstance(raw, dict):
            raise BankError("routing must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BankError(f"routing has unknown fields: {', '.join(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
