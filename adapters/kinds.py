"""What each bank kind may hold: which routers, which routing strategies, how many experts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindSpec:
    strategies: tuple[str, ...]  # allowed RoutingConfig.strategy values
    linear_router: bool  # every adapted linear has its own router [N, in] (dynmole, mola)
    block_router: bool  # one router per layer on the FFN input, N FFN experts (mixlora)
    extra_tensors: bool = False  # kind-specific named tensors (bank-level or per layer)
    lora_experts: bool = True  # holds LoRA experts on its targets (factor replaces the FFN instead)


KINDS: dict[str, KindSpec] = {
    "lora": KindSpec(strategies=("none",), linear_router=False, block_router=False),
    "mixlora": KindSpec(strategies=("topk", "topp"), linear_router=False, block_router=True),
    "dynmole": KindSpec(strategies=("dynmole",), linear_router=True, block_router=False),
    "mola": KindSpec(strategies=("topk",), linear_router=True, block_router=False),
    # FactorLLM: the base FFN split into experts, a block router per layer, and extra tensors per
    # layer (neuron permutation, output scale, optional fine-tuned slices); rules in adapters/factor/bank.py.
    "factor": KindSpec(strategies=("topk",), linear_router=False, block_router=True, extra_tensors=True,
                       lora_experts=False),
    # Parrot: a projector + visual mixture for a base with a vision tower; bank-level extra tensors
    # with the release's keys, nothing per layer, no LoRA; rules in adapters/parrot/bank.py.
    "parrot": KindSpec(strategies=("none",), linear_router=False, block_router=False, extra_tensors=True,
                       lora_experts=False),
}

# Named by the format so that no other meaning can take the name; defined by a later issue.
RESERVED_KINDS: dict[str, str] = {}
