"""Which base model a bank belongs to, and the shapes of the linears it adapts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import BankError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = TARGETS[:4]
FFN_TARGETS = TARGETS[4:]


@dataclass(frozen=True)
class BaseFingerprint:
    """Architecture and sizes of the base model (not a hash of its weights): a bank runs on any
    model with the same fingerprint, e.g. a re-quantised copy of the same checkpoint."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "BaseFingerprint":
        """From a Hugging Face ``config.json`` (or a fingerprint dict as stored in ``bank.json``)."""
        if not isinstance(cfg, dict):
            raise BankError("base model config must be a JSON object")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise BankError(f"base model config: model_type must be a non-empty string, got {model_type!r}")

        def positive(key: str, default: Any = None) -> int:
            value = cfg.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BankError(f"base model config: {key} must be a positive integer, got {value!r}")
            return value

        hidden = positive("hidden_size")
        heads = positive("num_attention_heads")
        head_dim = cfg.get("head_dim") or (hidden // heads)
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=positive("intermediate_size"),
            num_hidden_layers=positive("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=positive("num_key_value_heads", heads),
            head_dim=positive("head_dim", head_dim),
            vocab_size=positive("vocab_size"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatches(self, other: "BaseFingerprint") -> list[str]:
        """Human-readable differences, e.g. ``["hidden_size 64 != 128"]``; empty when they match."""
        return [
            f"{f.name} {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of ``target`` in one decoder layer."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if target not in shapes:
            raise BankError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
        return shapes[target]
