"""Reading a Hugging Face checkpoint's tensors, with every failure turned into one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ModelLoadError


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    # Pickles are untrusted input: weights_only refuses anything but tensors and plain containers.
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt/hostile file
        raise ModelLoadError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors")
    return state


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: sharded or single safetensors, or pytorch_model*.bin."""
    index = folder / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: malformed index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: listed in {index.name} but missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_read_safetensors(f))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(_read_pickle(f))
        return state
    raise ModelLoadError(f"{folder}: no weights found (expected *.safetensors or pytorch_model*.bin)")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names of a Llama-family model and their shapes."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            for name, n in (("gate_proj", i), ("up_proj", i), ("down_proj", h)):
                shapes[p + f"mlp.{name}.bias"] = (n,)
    return shapes


def load_state(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Read (unless ``state`` holds the folder's tensors already) and validate a checkpoint against the
    config: every tensor present, shaped, finite dtype. Returns the language model's tensors only."""
    state = dict(read_checkpoint(folder) if state is None else state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{folder}: missing tensor {missing[0]}{more}")
    for name, shape in shapes.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise ModelLoadError(f"{folder}: tensor {name} has dtype {t.dtype}, expected a floating-point type")
    return {k: state[k] for k in shapes}
