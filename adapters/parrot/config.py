"""Parrot's vision-side configuration (ALGORITHMS.md §5), read from a checkpoint's config.json or a
``parrot`` bank's bank.json, validated once; and the serving-time visual routing mode."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PROJECTOR_RE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
SELECT_FEATURES = ("patch", "cls_patch")
# The released config names this id when the image goes first in the user turn; <image> in LLaVA data.
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the release's sentinel id: not a vocabulary token


class ParrotConfigError(ValueError):
    """A Parrot config key is missing or out of range; the message names the key."""


@dataclass(frozen=True)
class ParrotConfig:
    """What the projector and the mixture are, and how the tower's features are selected.

    ``hidden_size`` is the LLM's (D); ``mm_hidden_size`` the tower's. The mixture exists when
    ``moe_hidden_size`` is set (``use_moe`` false bypasses it, as stage 1 of training does).
    """

    hidden_size: int
    mm_hidden_size: int
    projector_type: str = "mlp2x_gelu"
    select_layer: int = -2
    select_feature: str = "cls_patch"
    image_aspect_ratio: str = "pad"
    num_experts: int = 0
    moe_intermediate_size: int = 0
    moe_weight: float = 1.0
    use_moe: bool = False
    moe_top_k: int = 0  # stored by the release, unused by it (every expert runs)
    max_length: int | None = None  # tokenizer_model_max_length: the release truncates the merged prompt
    vision_tower: str | None = None  # mm_vision_tower: a hub id in the release, a local folder here

    @property
    def projector_depth(self) -> int:
        m = PROJECTOR_RE.match(self.projector_type)
        return 1 if m.group(1) == "linear" else int(m.group(2))

    @property
    def has_mixture(self) -> bool:
        return self.use_moe and self.num_experts > 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, hidden_size: int | None = None, where: str = "config.json") -> "ParrotConfig":
        def bad(key: str, why: str) -> ParrotConfigError:
            return ParrotConfigError(f"{where}: {key} {why}, got {raw.get(key)!r}")

        def pos_int(key: str, default: Any = None, *, zero_ok: bool = False) -> int:
            v = raw.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1) or v > 1 << 20:
                raise bad(key, "must be a positive integer (at most 2^20)")
            return v

        d = hidden_size if hidden_size is not None else pos_int("hidden_size")
        projector = raw.get("mm_projector_type", "mlp2x_gelu")
        if not isinstance(projector, str) or not PROJECTOR_RE.match(projector) or (
                projector != "linear" and not 1 <= int(PROJECTOR_RE.match(projector).group(2)) <= 8):
            raise bad("mm_projector_type", "must be 'linear' or 'mlp<N>x_gelu' (N in 1..8)")
        layer = raw.get("mm_vision_select_layer", -2)
        if not isinstance(layer, int) or isinstance(layer, bool) or not -64 <= layer <= 64:
            raise bad("mm_vision_select_layer", "must be an integer layer index")
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in SELECT_FEATURES:
            raise bad("mm_vision_select_feature", f"must be one of {SELECT_FEATURES}")
        aspect = raw.get("image_aspect_ratio", "pad")
        if aspect not in ("pad", "square", None):
            raise bad("image_aspect_ratio", "must be 'pad' or 'square'")
        has_moe = raw.get("moe_hidden_size") is not None
        use_moe = raw.get("use_moe", has_moe)
        if not isinstance(use_moe, bool):
            raise bad("use_moe", "must be true or false")
        experts = inter = 0
        if has_moe:
            if pos_int("moe_hidden_size") != d:
                raise bad("moe_hidden_size", f"must equal the LLM's hidden_size ({d})")
            experts = pos_int("num_experts")
            if experts > 256:
                raise bad("num_experts", "must be at most 256")
            inter = pos_int("moe_intermediate_size")
        weight = raw.get("moe_weight", 1.0)  # the release falls back to 1.0 when the key is missing
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -1e4 <= weight <= 1e4:
            raise bad("moe_weight", "must be a finite number")
        top_k = raw.get("moe_top_k", 0) or 0
        max_len = raw.get("tokenizer_model_max_length")
        if max_len is not None:
            max_len = pos_int("tokenizer_model_max_length")
        tower = raw.get("mm_vision_tower")
        if tower is not None and not isinstance(tower, str):
            raise bad("mm_vision_tower", "must be a string")
        return cls(hidden_size=d, mm_hidden_size=pos_int("mm_hidden_size"), projector_type=projector,
                   select_layer=layer, select_feature=feature, image_aspect_ratio=aspect or "square",
                   num_experts=experts, moe_intermediate_size=inter, moe_weight=float(weight),
                   use_moe=use_moe and has_moe, moe_top_k=int(top_k) if isinstance(top_k, int) else 0,
                   max_length=max_len, vision_tower=tower)

    def to_dict(self) -> dict[str, Any]:
        """The keys of the released config.json (what ``from_dict`` reads back)."""
        out: dict[str, Any] = {
            "mm_hidden_size": self.mm_hidden_size, "mm_projector_type": self.projector_type,
            "mm_vision_select_layer": self.select_layer, "mm_vision_select_feature": self.select_feature,
            "image_aspect_ratio": self.image_aspect_ratio, "use_moe": self.use_moe, "moe_weight": self.moe_weight,
        }
        if self.num_experts:
            out.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                       moe_hidden_size=self.hidden_size, moe_top_k=self.moe_top_k)
        if self.max_length is not None:
            out["tokenizer_model_max_length"] = self.max_length
        if self.vision_tower is not None:
            out["mm_vision_tower"] = self.vision_tower
        return out


@dataclass(frozen=True)
class VisualRouting:
    """``--visual-routing``: ``dense`` (the release: every expert, plain softmax weights),
    ``topk:K`` (the K best experts, weights renormalised), ``dynmole`` (ALGORITHMS.md §2's hybrid
    rule on the image's routing vector, weights not renormalised, DynMoLE's default parameters)."""

    mode: str = "dense"
    k: int = 0
    top_p: float = 0.75
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    q: float = 1.1

    @classmethod
    def parse(cls, spec: str) -> "VisualRouting":
        spec = spec.strip().lower()
        if spec == "dense":
            return cls("dense")
        if spec == "dynmole":
            return cls("dynmole")
        m = re.fullmatch(r"topk:(\d+)", spec)
        if m and int(m.group(1)) >= 1:
            return cls("topk", k=int(m.group(1)))
        raise ValueError(f"visual routing {spec!r}: expected dense, topk:K (K >= 1) or dynmole")

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.mode == "topk" else self.mode
