"""The ``parrot`` bank kind: a Parrot projector + visual mixture (a ``VisualAdapter``) for a base model
that has a vision tower but no projector of its own.

A parrot bank applies no LoRA to the LLM. It holds:

- ``bank.json`` field ``parrot``: the adapter's ``ParrotConfig`` (the released config.json's vision
  keys: ``mm_hidden_size``, ``mm_projector_type``, ``num_experts``, ``moe_intermediate_size``,
  ``moe_weight``, ``use_moe``, ...) and ``tokens_per_image``, the visual tokens per image of the tower
  it was trained on (577 for CLIP ViT-L/14-336 with CLS);
- bank-level ``extra`` tensors named with the release's keys under ``model.``:
  ``extra.mm_projector.0.weight``, ``extra.mm_projector.0.bias``, ``extra.mm_projector.2.*``, and with
  a mixture ``extra.moe_model.gate.weight`` [E, D], ``extra.moe_model.experts.{i}.{gate,up,down}_proj.weight``.

``rank``/``alpha`` are unused and written as 1, ``targets`` is empty, ``routing`` is ``none`` (the
visual routing is the server's ``--visual-routing``), every entry of ``layers`` is empty. The base
fingerprint is checked like every bank's (D and the vocabulary must match the LLM the adapter feeds);
the tower is checked when the bank is loaded into a server (``check_tower``): a bank is refused on a
base with no tower, or with a tower of another width or token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..bank import ExpertBank, LayerAdapters
from ..errors import BankError
from ..fingerprint import BaseFingerprint
from ..routing import RoutingConfig
from .config import ParrotConfig, ParrotConfigError
from .modules import VisualAdapter

KIND = "parrot"
MAX_TOKENS_PER_IMAGE = 1 << 16
# What ParrotConfig.to_dict writes (the released config.json's vision-side keys).
_CONFIG_KEYS = {
    "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "image_aspect_ratio", "use_moe", "moe_weight", "num_experts", "moe_intermediate_size", "moe_hidden_size",
    "moe_top_k", "tokenizer_model_max_length", "mm_vision_tower",
}


@dataclass(frozen=True)
class TowerSpec:
    """What a served vision tower feeds a projector: its width (``mm_hidden_size``), how many tokens
    per image, and (when known) which hidden state it returns. Published by the served model; a
    parrot bank must match it."""

    hidden_size: int
    tokens_per_image: int
    select_layer: int | None = None
    select_feature: str | None = None

    @classmethod
    def of(cls, tower) -> "TowerSpec":
        """From a ``server.model.vision.VisionTower`` (or anything with its four attributes)."""
        return cls(tower.hidden_size, tower.num_tokens, tower.select_layer, tower.select_feature)


@dataclass(frozen=True)
class ParrotBankConfig:
    """``bank.json``'s ``parrot`` object: the adapter's config and the tower it was trained for."""

    config: ParrotConfig
    tokens_per_image: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "tokens_per_image": self.tokens_per_image}

    @classmethod
    def from_dict(cls, raw: Any, *, hidden_size: int) -> "ParrotBankConfig":
        if not isinstance(raw, dict):
            raise BankError("parrot must be an object (the adapter's Parrot config and tokens_per_image)")
        raw = dict(raw)
        tokens = raw.pop("tokens_per_image", None)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_TOKENS_PER_IMAGE:
            raise BankError(f"parrot.tokens_per_image must be an integer in [1, {MAX_TOKENS_PER_IMAGE}], got {tokens!r}")
        unknown = sorted(set(raw) - _CONFIG_KEYS)
        if unknown:
            raise BankError(f"parrot has unknown fields: {', '.join(unknown)}")
        try:
            cfg = ParrotConfig.from_dict(raw, hidden_size=hidden_size, where="parrot")
        except ParrotConfigError as exc:
            raise BankError(str(exc)) from None
        return cls(cfg, tokens)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The adapter's state-dict keys (the release's, without ``model.``) and their shapes."""
        with torch.device("meta"):
            adapter = VisualAdapter(self.config)
        return {k: tuple(t.shape) for k, t in adapter.state_dict().items()}


def build_parrot_bank(name: str, base: BaseFingerprint, adapter: VisualAdapter, *, tokens_per_image: int,
                      version: str = "1") -> ExpertBank:
    """A validated parrot bank holding ``adapter``'s weights (copied to fp32 on the CPU)."""
    extra = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in adapter.state_dict().items()}
    bank = ExpertBank(
        name=name, version=version, kind=KIND, base=base, rank=1, alpha=1.0, use_rslora=False,
        routing=RoutingConfig(strategy="none"), targets=(), layers=[LayerAdapters() for _ in range(base.num_hidden_layers)],
        extra=extra, parrot=ParrotBankConfig(adapter.config, tokens_per_image),
    )
    from ..validation import validate_bank

    return validate_bank(bank)


def visual_adapter(bank: ExpertBank, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> VisualAdapter:
    """The bank's ``VisualAdapter`` (eval mode, no gradients), on ``device`` in ``dtype``."""
    if bank.kind != KIND or bank.parrot is None:
        raise BankError(f"kind {bank.kind!r} holds no visual adapter", bank=bank.name)
    with torch.device("meta"):
        adapter = VisualAdapter(bank.parrot.config)
    adapter.load_state_dict(bank.extra, strict=True, assign=True)
    adapter = adapter.to(device=device, dtype=dtype).eval()
    adapter.requires_grad_(False)
    return adapter


def check_tower(bank: ExpertBank, tower: TowerSpec | None) -> None:
    """Raise BankError (one line naming why) unless ``bank`` can run on a server with ``tower``."""
    info = bank.parrot
    if tower is None:
        raise BankError("is a parrot bank (a projector and visual mixture): the served model has no vision tower; "
                        "start the server with --vision-tower DIR", bank=bank.name)
    cfg = info.config
    if cfg.mm_hidden_size != tower.hidden_size:
        raise BankError(f"was trained on a vision tower of width {cfg.mm_hidden_size} (mm_hidden_size), "
                        f"the served tower's is {tower.hidden_size}", bank=bank.name)
    if info.tokens_per_image != tower.tokens_per_image:
        raise BankError(f"was trained on {info.tokens_per_image} visual tokens per image, the served tower gives "
                        f"{tower.tokens_per_image}", bank=bank.name)
    if tower.select_layer is not None and cfg.select_layer != tower.select_layer:
        raise BankError(f"was trained on the tower's hidden state {cfg.select_layer} (mm_vision_select_layer), "
                        f"the server selects {tower.select_layer}", bank=bank.name)
    if tower.select_feature is not None and cfg.select_feature != tower.select_feature:
        raise BankError(f"was trained on {cfg.select_feature!r} features (mm_vision_select_feature), "
                        f"the server selects {tower.select_feature!r}", bank=bank.name)


def validate_parrot_bank(bank: ExpertBank, values: bool) -> None:
    """The parrot kind's rules (called by ``validate_bank`` after the generic checks)."""
    if not isinstance(bank.parrot, ParrotBankConfig):
        raise BankError("kind 'parrot' needs its parrot config (bank.json field parrot)")
    if bank.parrot.config.hidden_size != bank.base.hidden_size:
        raise BankError(f"parrot adapter width {bank.parrot.config.hidden_size} != the base model's hidden_size "
                        f"{bank.base.hidden_size}")
    if bank.targets:
        raise BankError(f"kind 'parrot' applies no LoRA to the LLM: targets must be empty, got {list(bank.targets)}")
    if bank.routing.strategy != "none":
        raise BankError(f"kind 'parrot' has routing 'none' (the visual routing is the server's), got {bank.routing.strategy!r}")
    if any(not layer.is_empty() for layer in bank.layers):
        raise BankError("kind 'parrot' has nothing per decoder layer: every entry of layers must be empty")
    expected = bank.parrot.tensor_shapes()
    missing = sorted(set(expected) - set(bank.extra))
    if missing:
        raise BankError(f"missing tensors {', '.join('extra.' + k for k in missing)}")
    unknown = sorted(set(bank.extra) - set(expected))
    if unknown:
        raise BankError(f"unknown tensors {', '.join('extra.' + k for k in unknown)} for this parrot config")
    for key, shape in expected.items():
        t: Tensor = bank.extra[key]
        if tuple(t.shape) != shape:
            raise BankError(f"tensor extra.{key} has shape {tuple(t.shape)}, expected {shape}")
