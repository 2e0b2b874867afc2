"""The trainer's one typed configuration, with the defaults of each method's recipe.

Defaults (ALGORITHMS.md): dynmole N=6, r=24, alpha=48, targets gate/up/down, top_p 0.75,
keep_top_k 2, entropy threshold 0.9, q 1.1, entropy loss 0.01, balance 0.001; mixlora N=8, top-2,
r=16, alpha=32, every projection (attention: plain LoRA), balance 0.001; lora r=16, alpha=32,
gate/up/down. All: AdamW lr 2e-4 constant, batch 16, 2 epochs, cutoff 512, dropout 0.05.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.fingerprint import TARGETS
from adapters.routing import RoutingConfig

from .modules import BankSpec

KINDS = ("dynmole", "mixlora", "lora", "parrot")
_RECIPES: dict[str, dict[str, Any]] = {
    "dynmole": {"experts": 6, "rank": 24, "targets": ["gate_proj", "up_proj", "down_proj"]},
    "mixlora": {"experts": 8, "rank": 16, "targets": list(TARGETS)},
    "lora": {"experts": 1, "rank": 16, "targets": ["gate_proj", "up_proj", "down_proj"]},
    # Parrot (adapters/parrot/train.py): E = 6 visual experts as released; no LoRA (rank unused).
    "parrot": {"experts": 6, "rank": 1, "targets": []},
}


class ConfigError(ValueError):
    """An invalid training configuration (reported as one line)."""


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    out: str = ""
    model: str | None = None  # None: the embedded default model
    kind: str = "dynmole"
    name: str | None = None  # bank name; default: the output folder's name
    experts: int | None = None
    rank: int | None = None
    alpha: float | None = None  # default 2 * rank
    targets: list[str] | None = None
    top_k: int = 2  # mixlora routing
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # global batch (sequences per optimizer step, all ranks together)
    micro_batch_size: int = 4  # sequences per forward; batch_size / (micro * ranks) = accumulation
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    max_seconds: float | None = None  # stop (and save) after the step that crosses this wall time
    cutoff: int = 512  # tokens per sequence
    limit: int | None = None  # a seeded random subset of this many records from the union of files
    dropout: float = 0.05
    entropy_coef: float = 0.01  # dynmole
    balance_coef: float = 0.001
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    threads: int | None = None
    progress: bool = True
    # kind parrot (ALGORITHMS.md §5): the frozen tower, the stage, the adapter's shape
    vision_tower: str | None = None  # a local transformers folder (CLIP, SigLIP, Dinov2)
    image_folder: str | None = None  # image paths are relative to it (default: each data file's folder)
    stage: int = 2  # 1: the projector alone (mixture bypassed); 2: projector + mixture
    init: str | None = None  # a parrot bank to start from (e.g. stage 1's, for stage 2)
    projector_type: str = "mlp2x_gelu"
    moe_intermediate_size: int | None = None  # the experts' I (default: the LLM's hidden size, as released)
    moe_weight: float = 1.0  # lambda in sum_e w_e E_e(Hv) + lambda Hv (released 0.1; 1 keeps stage 1's output at init)
    select_layer: int = -2  # the tower's hidden state fed to the projector
    select_feature: str = "cls_patch"  # cls_patch (CLS kept, as released) or patch

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A YAML or JSON file holding any of the fields above."""
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must hold a mapping of training options")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown training options: {', '.join(unknown)}")
        cfg = cls(**raw)
        if isinstance(cfg.data, str):
            cfg.data = [cfg.data]
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe default filled in, validated."""
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        recipe = _RECIPES[self.kind]
        cfg = TrainConfig(**self.to_dict())
        cfg.experts = 1 if cfg.kind == "lora" else (cfg.experts or recipe["experts"])
        cfg.rank = cfg.rank or recipe["rank"]
        cfg.alpha = float(cfg.alpha if cfg.alpha is not None else 2 * cfg.rank)
        cfg.targets = list(cfg.targets or recipe["targets"])
        bad = [t for t in cfg.targets if t not in TARGETS]
        if bad:
            raise ConfigError(f"unknown targets {bad} (known: {', '.join(TARGETS)})")
        if not cfg.data:
            raise ConfigError("no training data: give --data FILE (repeatable)")
        if not cfg.out:
            raise ConfigError("no output folder: give --out DIR")
        for key in ("batch_size", "micro_batch_size", "cutoff", "experts", "rank", "top_k"):
            value = getattr(cfg, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if cfg.batch_size % cfg.micro_batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {cfg.micro_batch_size}")
        if cfg.max_steps is None and not cfg.epochs > 0:
            raise ConfigError("give epochs > 0 or max_steps")
        if cfg.kind == "mixlora" and cfg.top_k > cfg.experts:
            raise ConfigError(f"top_k {cfg.top_k} exceeds the {cfg.experts} experts")
        if not 0 <= cfg.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.kind == "parrot":
            if not cfg.vision_tower:
                raise ConfigError("kind parrot needs the frozen vision tower: give --vision-tower DIR")
            if cfg.stage not in (1, 2):
                raise ConfigError(f"stage must be 1 (projector) or 2 (projector + mixture), got {cfg.stage!r}")
        return cfg

    def bank_spec(self) -> BankSpec:
        cfg = self.resolved()
        if cfg.kind == "parrot":
            raise ConfigError("kind parrot trains a visual adapter, not LoRA experts (adapters/parrot/train.py)")
        if cfg.kind == "dynmole":
            routing = RoutingConfig(strategy="dynmole")
        elif cfg.kind == "mixlora":
            routing = RoutingConfig(strategy="topk", top_k=cfg.top_k)
        else:
            routing = RoutingConfig(strategy="none")
        return BankSpec(kind=cfg.kind, num_experts=cfg.experts, rank=cfg.rank, alpha=cfg.alpha,
                        targets=tuple(t for t in TARGETS if t in cfg.targets), routing=routing)
