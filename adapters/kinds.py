"""What each bank kind may hold: which routers, which routing strategies, how many experts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindSpec:
    strategies: tuple[str, ...]  # allowed RoutingConfig.strategy values
    linear_router: bool  # every adapted linear has its own router [N, in] (dynmole, mola)
    block_router: bool  # one router per layer on the FFN input, N FFN experts (mixlora)
    extra_tensors: bool = False  # kind-specific named tensors (bank-level or per layer)


KINDS: dict[str, KindSpec] = {
    "lora": KindSpec(strategies=("none",), linear_router=False, block_router=False),
    "mixlora": KindSpec(strategies=("topk", "topp"), linear_router=False, block_router=True),
    "dynmole": KindSpec(strategies=("dynmole",), linear_router=True, block_router=False),
    "mola": KindSpec(strategies=("topk",), linear_router=True, block_router=False),
}

# Named by the format so that no other meaning can take the name; defined by a later issue.
RESERVED_KINDS = {"factor": "factorised dense FFN experts (FactorLLM)"}
