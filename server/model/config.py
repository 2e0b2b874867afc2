"""The base model's architecture, read from a Hugging Face ``config.json`` and validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Multimodal checkpoints whose language model is one of the above (the vision side: server/model/parrot.py).
LANGUAGE_MODEL_OF = {"parrot_qwen2": "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward needs to know about a Llama-family model.

    ``qkv_bias`` / ``o_bias`` differ by family: Llama's ``attention_bias`` puts a bias on all four
    attention projections, Qwen2 has one on q/k/v only, Mistral on none.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "model") -> "ModelConfig":
        if raw.get("model_type") in LANGUAGE_MODEL_OF:  # the language model of a multimodal checkpoint
            raw = {**raw, "model_type": LANGUAGE_MODEL_OF[raw["model_type"]]}
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"config.json: model_type {model_type!r} is not a supported Llama-family model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need_int(key: str, default: int | None = None) -> int:
            value = raw.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"config.json: {key} must be a positive integer, got {value!r}")
            return value

        hidden = need_int("hidden_size")
        heads = need_int("num_attention_heads")
        kv_heads = need_int("num_key_value_heads", heads)
        head_dim = raw.get("head_dim") or hidden // heads
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ModelLoadError(f"config.json: head_dim must be a positive even integer, got {head_dim!r}")
        if heads % kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"config.json: hidden_act {act!r} is not supported (only silu)")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "llama":
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        else:
            qkv_bias = o_bias = False
        sliding = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=need_int("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act="silu",
            sliding_window=sliding if isinstance(sliding, int) and sliding > 0 else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
            raw=raw,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        folder = Path(folder)
        if not folder.exists():
            raise ModelLoadError(f"model path {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise ModelLoadError(f"model path {str(folder)!r} is not a folder (a Hugging Face model folder is expected)")
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing (not a Hugging Face model folder)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, name=folder.name)

    def hf_config(self):
        """The transformers config object (used for RoPE variants and as the reference)."""
        from transformers import AutoConfig  # noqa: PLC0415 - heavy import, only when needed

        raw = {k: v for k, v in self.raw.items() if k not in ("quantization_config",)}
        return AutoConfig.for_model(**raw)

    def fingerprint(self) -> dict[str, Any]:
        """Architecture and sizes: what an adapter bank must match to run on this model."""
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }
