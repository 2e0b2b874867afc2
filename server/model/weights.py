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


# GGUF names of a Llama block's linears -> HF names (llama.cpp's convert_hf_to_gguf naming).
_GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


def _unpermute_rope(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its interleaved RoPE layout -> HF's rotate-half), on
    any tensor whose first dim is the output rows."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _gguf_blocks(tensor) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor -> (kind, codes [out, in], scale [out, in/32], offset or None).

    Q4_0: w = d (q - 8), Q4_1: w = d q + m (q: 4 bits, element j of a block in the low nibble of
    byte j, element j + 16 in its high nibble), Q8_0: w = d q (q: int8); d and m are fp16."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    kind = tensor.tensor_type
    raw = np.asarray(tensor.data)  # [out, bytes per row]
    out = raw.shape[0]
    head = {Q.Q4_0: 2, Q.Q4_1: 4, Q.Q8_0: 2}[kind]
    block = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[kind]
    blocks = raw.reshape(out, -1, block)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == Q.Q8_0:
        codes = torch.from_numpy(blocks[..., head:].copy().view(np.int8).astype(np.int32)).reshape(out, -1)
        return "q8_0", codes, d, None
    qs = torch.from_numpy(blocks[..., head:].astype(np.int32))  # [out, G, 16]
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(out, -1)
    if kind == Q.Q4_0:
        return "q4_0", codes, d, None
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return "q4_1", codes, d, m


def read_gguf_quantized(path: Path, cfg: ModelConfig) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The quantized (Q4_0, Q4_1, Q8_0) linear weights of a Llama GGUF file under their HF names
    (``model.layers.N.self_attn.q_proj.weight``, ``lm_head.weight`` for the output or, tied, the token
    embedding), as ``_gguf_blocks`` gives them, q and k rows back in HF order. Tensors in other types
    are left out (the caller keeps their float values). Raises ModelLoadError naming the file."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF ({exc})") from None
    shapes = expected_shapes(cfg)
    found: dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
            continue
        parts = tensor.name.split(".")
        if tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and cfg.tie_word_embeddings):
            name = "lm_head.weight" if tensor.name == "output.weight" else "model.embed_tokens.weight"
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LINEARS:
            name = f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}.weight"
        else:
            continue
        kind, codes, scale, offset = _gguf_blocks(tensor)
        want = shapes.get(name)
        if want is None or tuple(codes.shape) != want:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has shape {tuple(codes.shape)}, expected {want}")
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            codes, scale = _unpermute_rope(codes, heads), _unpermute_rope(scale, heads)
            offset = None if offset is None else _unpermute_rope(offset, heads)
        if not (torch.isfinite(scale).all() and (offset is None or torch.isfinite(offset).all())):
            raise ModelLoadError(f"{path}: tensor {tensor.name} holds NaN or inf scales")
        found[name] = (kind, codes, scale, offset)
    return found


# The converted form of a checkpoint's own quantized blocks: one safetensors file beside the float
# weights, read at load in a fraction of the GGUF parse (whose metadata alone takes seconds).
QUANTIZED_FILE = "quantized.safetensors"


def save_quantized_blocks(blocks: dict, path: Path) -> None:
    """Write ``read_gguf_quantized`` output: per HF name ``.codes`` (4-bit: two per byte, even
    column in the low nibble; Q8_0: int8), ``.scale``, ``.offset`` (Q4_1), the kind in the metadata."""
    from safetensors.torch import save_file

    tensors, kinds = {}, {}
    for name, (kind, codes, scale, offset) in blocks.items():
        if kind == "q8_0":
            tensors[name + ".codes"] = codes.to(torch.int8).contiguous()
        else:
            tensors[name + ".codes"] = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).contiguous()
        tensors[name + ".scale"] = scale.contiguous()
        if offset is not None:
            tensors[name + ".offset"] = offset.contiguous()
        kinds[name] = kind
    save_file(tensors, str(path), metadata={"kinds": json.dumps(kinds)})


def load_quantized_blocks(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``save_quantized_blocks``' file back, every block checked against ``shapes`` (HF name -> [out, in],
    as ``expected_shapes`` gives them)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = json.loads((f.metadata() or {}).get("kinds", "{}"))
            blocks = {}
            for name, kind in kinds.items():
                codes = f.get_tensor(name + ".codes")
                if kind != "q8_0":
                    codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
                offset = f.get_tensor(name + ".offset") if name + ".offset" in f.keys() else None
                blocks[name] = (kind, codes.to(torch.int32), f.get_tensor(name + ".scale"), offset)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot read quantized blocks ({exc})") from None
    for name, (kind, codes, scale, offset) in blocks.items():
        if kind not in ("q4_0", "q4_1", "q8_0") or shapes.get(name) != tuple(codes.shape) \
                or scale.shape[0] != codes.shape[0] or (kind == "q4_1") != (offset is not None):
            raise ModelLoadError(f"{path}: block {name} ({kind}, {tuple(codes.shape)}) does not fit the model")
    return blocks
