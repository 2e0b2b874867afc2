"""An expert bank in memory: LoRA experts per layer and target, their routers, and how to route.

This is what the model and the registry consume. Every tensor is fp32 on the CPU as loaded; the
consumer moves and casts it. A bank returned by ``load_bank``/``ExpertBank.load`` has passed
``validate_bank``: shapes match its base fingerprint, values are finite, the kind's rules hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from .fingerprint import ATTENTION_TARGETS, BaseFingerprint
from .routing import RoutingConfig

if TYPE_CHECKING:
    from .parrot.bank import ParrotBankConfig


def linear_name(layer: int, target: str) -> str:
    """``layers.3.mlp.gate_proj``: the HF module path of a targeted linear, minus ``model.``."""
    module = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    return f"layers.{layer}.{module}.{target}"


def tensor_name(layer: int, target: str | None, part: str) -> str:
    """Name of a tensor in ``weights.safetensors``: ``layers.3.mlp.gate_proj.lora_a``,
    ``layers.0.self_attn.q_proj.router``, or ``layers.3.mlp.block_router`` (target None)."""
    if target is None:
        return f"layers.{layer}.mlp.{part}"
    return f"{linear_name(layer, target)}.{part}"


@dataclass
class LinearExperts:
    """The experts of one targeted linear in one layer; expert e's delta is scaling * B_e (A_e x)."""

    lora_a: Tensor  # [N, r, in_features] fp32
    lora_b: Tensor  # [N, out_features, r] fp32
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    router: Tensor | None = None  # [N, in_features] fp32: per-linear router (dynmole, mola)

    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        named = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        if self.router is not None:
            named["router"] = self.router
        return named


@dataclass
class LayerAdapters:
    """What a bank adds to one decoder layer (all empty when the layer is untouched)."""

    linears: dict[str, LinearExperts] = field(default_factory=dict)  # target name -> experts
    block_router: Tensor | None = None  # [N, hidden] fp32: mixlora's router on the FFN input
    extra: dict[str, Tensor] = field(default_factory=dict)  # kind-specific tensors (factor, ...)

    def is_empty(self) -> bool:
        return not self.linears and self.block_router is None and not self.extra

    def num_experts(self) -> int:
        """Experts routed in this layer (the largest count when targets differ); 0 if untouched."""
        counts = [le.num_experts() for le in self.linears.values()]
        if self.block_router is not None:
            counts.append(self.block_router.shape[0])
        return max(counts, default=0)


@dataclass
class ExpertBank:
    name: str
    version: str
    kind: str  # one of adapters.kinds.KINDS
    base: BaseFingerprint
    rank: int
    alpha: float
    use_rslora: bool
    routing: RoutingConfig
    targets: tuple[str, ...]  # in TARGETS order
    layers: list[LayerAdapters]  # one per decoder layer of the base model
    extra: dict[str, Tensor] = field(default_factory=dict)  # kind-specific bank-level tensors
    act_fn: str | None = None  # mixlora: the experts' activation; None = the base model's own
    parrot: "ParrotBankConfig | None" = None  # kind parrot: the visual adapter's config (adapters/parrot/bank.py)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def num_experts(self) -> int:
        """The most experts any one router of this bank chooses among (1 for a plain LoRA)."""
        return max((layer.num_experts() for layer in self.layers), default=0)

    def named_tensors(self) -> dict[str, Tensor]:
        """Every tensor under its name in ``weights.safetensors`` (see docs/bank-format.md)."""
        named: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            for target, experts in layer.linears.items():
                for part, t in experts.tensors().items():
                    named[tensor_name(i, target, part)] = t
            if layer.block_router is not None:
                named[tensor_name(i, None, "block_router")] = layer.block_router
            for key, t in layer.extra.items():
                named[f"layers.{i}.extra.{key}"] = t
        for key, t in self.extra.items():
            named[f"extra.{key}"] = t
        return named

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.named_tensors().values())

    def save(self, folder: str | Path) -> None:
        """Validate, then write ``bank.json`` and ``weights.safetensors`` into ``folder``."""
        from .storage import save_bank

        save_bank(self, folder)

    @classmethod
    def load(cls, folder: str | Path, *, base: BaseFingerprint | None = None) -> "ExpertBank":
        """Load and validate a bank in this project's format (``load_bank`` also converts)."""
        from .storage import load_saved_bank

        return load_saved_bank(folder, base=base)
