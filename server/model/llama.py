"""A compact Llama-family forward over a flat batch of tokens from many sequences (no padding).

Each token carries its position (``StepContext.positions``); attention is delegated to the step's
``AttentionStep`` (paged cache in the engine, a simple cache in tests); every adapter-targetable
linear is a ``TargetLinear`` hook point. q/k/v and gate/up are fused into one GEMM each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .context import get_step_context
from .errors import ModelLoadError
from .fused_decode import FusedDecode, fused_step
from .layers import RMSNorm, RotaryEmbedding, TargetLinear, apply_rotary, pack_linear_weight, packed_linear
from .quantization import QUANTIZATIONS, Int4Weight, from_gguf_blocks, quantize_weight
from .weights import QUANTIZED_FILE, expected_shapes, load_quantized_blocks, load_state


log = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = TargetLinear(layer, ("q_proj", "k_proj", "v_proj"), cfg.hidden_size,
                                     (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.qkv_bias)
        self.o_proj = TargetLinear(layer, ("o_proj",), cfg.q_size, (cfg.hidden_size,), cfg.o_bias)
        self.split = (cfg.q_size, cfg.kv_size, cfg.kv_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.split[0] + self.split[1]
        # q and k rotated in one pass over their [T, H + Hkv, D] view (half the small ops per layer)
        qk = apply_rotary(qkv[:, :qk_size].view(t, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q, k = qk.split((self.heads, self.kv_heads), dim=1)
        v = qkv[:, qk_size:].view(t, self.kv_heads, self.head_dim)
        out = get_step_context().attention.forward(self.layer, q, k, v)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)), gate and up fused into one GEMM."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = TargetLinear(layer, ("gate_proj", "up_proj"), cfg.hidden_size,
                                         (cfg.intermediate_size, cfg.intermediate_size), cfg.mlp_bias)
        self.down_proj = TargetLinear(layer, ("down_proj",), cfg.intermediate_size, (cfg.hidden_size,), cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = get_step_context().adapters
        if adapters is not None:
            replaced = adapters.mlp(self.layer, x, self)
            if replaced is not None:
                return replaced
        return self.dense(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """input_ids [T] (flat, many sequences) -> logits [L, vocab] for ``StepContext.logits_indices``."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        if rotary is None:
            with torch.device("cpu"):  # its tables are real even when the model is built on meta
                rotary = RotaryEmbedding(cfg)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        # the decoder described for the one-call C decode forward (``fused_decode.py``), built on the first
        # step that qualifies; False: this model cannot take it. Dropped when weights are replaced or moved.
        self._fused: FusedDecode | None | bool = None
        self.fused_decode_steps = 0  # steps that took it (tests and benchmarks read it)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> final normed hidden states [T, hidden]."""
        ctx = get_step_context()
        h = self.embed_tokens(input_ids)
        if ctx.input_embeds is not None:  # positions with precomputed embeddings (images)
            rows, embeds = ctx.input_embeds
            h = h.index_copy(0, rows, embeds.to(h.dtype))
        cos, sin = self.rotary(ctx.positions, h.dtype)
        fused = fused_step(self, ctx, h)
        if fused is not None:  # a base-only decode step: the whole stack in one C call
            self.fused_decode_steps += 1
            return fused(h, cos, sin)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def fused_decoder(self) -> FusedDecode | None:
        """The model's description for the fused decode forward, built once; None when unavailable."""
        if self._fused is None:
            self._fused = FusedDecode.build(self) or False
        return self._fused or None

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: the description points at the old tensors
        self._fused = None
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden_states(input_ids)
        idx = get_step_context().logits_indices
        if idx is not None:
            h = h.index_select(0, idx)
        return self.lm_head(h)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        quant = getattr(self, "lm_head_quant", None)
        if quant is not None:  # at every row count: a row's logits never depend on the step's other rows
            return quant.linear(h)
        packed = getattr(self, "lm_head_packed", None)
        if packed is not None and h.device.type == "cpu" and h.dtype == torch.float32 and not h.requires_grad:
            return packed_linear(h.contiguous(), packed, None)
        return F.linear(h, self.lm_head_weight)

    def pack_weights(self) -> bool:
        """Give every base linear and the LM head an inference copy of its weight in the CPU GEMM's
        preferred layout (see ``pack_linear_weight``); True when packed. Costs one more copy of
        those weights in memory; call again after editing weights, ``unpack_weights`` to drop them."""
        if self.lm_head_weight.device.type != "cpu":
            return False
        linears = [m for m in self.modules() if isinstance(m, TargetLinear) and m.quant is None]
        need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        need += self.lm_head_weight.numel() * self.lm_head_weight.element_size()
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            free = None
        if free is not None and need > free // 2:
            log.warning("base weights not packed for the CPU GEMM: the copy (%d MB) would take more than half "
                        "of the free memory (%d MB)", need >> 20, free >> 20)
            return False
        head = pack_linear_weight(self.lm_head_weight)
        if head is None:
            return False
        self.lm_head_packed = head
        for module in linears:
            module.packed = pack_linear_weight(module.weight)
        return True

    def unpack_weights(self) -> None:
        self.lm_head_packed = None
        for module in self.modules():
            if isinstance(module, TargetLinear):
                module.packed = None

    @torch.no_grad()
    def quantize(self, mode: str, gguf_blocks: dict | None = None) -> None:
        """Serve the base weights weight-only quantized (see ``server.model.quantization``): every
        ``TargetLinear`` in ``mode`` ("int4" or "int8"); the LM head becomes int8 weight-only (as
        GGUF files keep their token embedding in Q8_0 beside Q4 blocks), used for every step
        whatever its number of logits rows: both its kernels (ours on the CPU, fp32 activations;
        torch's, bfloat16) compute each row on its own, so a row's logits are bitwise the same alone
        or in any batch (a head chosen by row count made batched and one-by-one scoring differ by
        0.14 nats). On our CPU kernel it is faster than the fp32 head at 1 to 32 rows (BENCHMARKS.md,
        "Quantized base", "Our CPU kernel").
        The token embedding, norms and everything adapters add keep their dtype.

        ``gguf_blocks``: the checkpoint's own quantized blocks by HF name (``read_gguf_quantized``),
        used as stored where they fit ``mode`` (int4: Q4_0 / Q4_1 linears; the head: Q8_0); other
        weights are quantized from their float values."""
        if mode not in QUANTIZATIONS[1:]:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS[1:]}, got {mode!r}")
        self._fused = None
        blocks = gguf_blocks or {}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for linear, names in ((layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  (layer.self_attn.o_proj, ("self_attn.o_proj",)),
                                  (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                                  (layer.mlp.down_proj, ("mlp.down_proj",))):
                parts = [blocks.get(p + n + ".weight") for n in names]
                if mode == "int4" and all(x is not None and x[0] in ("q4_0", "q4_1") for x in parts):
                    linear.set_quantized(from_gguf_blocks(parts))
                else:
                    linear.quantize(mode)
        head = blocks.get("lm_head.weight" if not self.config.tie_word_embeddings else "model.embed_tokens.weight")
        if head is not None and head[0] == "q8_0":
            self.lm_head_quant = from_gguf_blocks([head])
        else:
            self.lm_head_quant = quantize_weight(self.lm_head_weight, "int8")

    @property
    def quantization(self) -> str:
        """"none", or the format of the base linears ("int4", "int8")."""
        quant = self.layers[0].self_attn.qkv_proj.quant if len(self.layers) else None
        return "none" if quant is None else ("int4" if isinstance(quant, Int4Weight) else "int8")

    @torch.no_grad()
    def load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a validated HF state dict in (fusing q/k/v and gate/up)."""
        cfg = self.config
        self._fused = None
        self.embed_tokens.weight.copy_(state["model.embed_tokens.weight"])
        self.norm.weight.copy_(state["model.norm.weight"])
        if not cfg.tie_word_embeddings:
            self.lm_head_weight.copy_(state["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.copy_(state[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(state[p + "post_attention_layernorm.weight"])
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj.weight.copy_(torch.cat([state[p + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]))
            if cfg.qkv_bias:
                attn.qkv_proj.bias.copy_(torch.cat([state[p + f"self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")]))
            attn.o_proj.weight.copy_(state[p + "self_attn.o_proj.weight"])
            if cfg.o_bias:
                attn.o_proj.bias.copy_(state[p + "self_attn.o_proj.bias"])
            mlp.gate_up_proj.weight.copy_(torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]))
            mlp.down_proj.weight.copy_(state[p + "mlp.down_proj.weight"])
            if cfg.mlp_bias:
                mlp.gate_up_proj.bias.copy_(torch.cat([state[p + "mlp.gate_proj.bias"], state[p + "mlp.up_proj.bias"]]))
                mlp.down_proj.bias.copy_(state[p + "mlp.down_proj.bias"])


def quantized_source(folder: Path) -> Path | None:
    """The file of a model folder's own quantized blocks (``weights.QUANTIZED_FILE``: the embedded
    default's converted folder holds its GGUF's Q4_1 / Q8_0 blocks there), or None."""
    path = folder / QUANTIZED_FILE
    return path if path.is_file() else None


def resolve_quantization(folder: str | Path, quantization: str) -> str:
    """"auto" -> the checkpoint's own: "int4" for a folder with quantized blocks, else "none"."""
    if quantization == "auto":
        return "int4" if quantized_source(Path(folder)) is not None else "none"
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization must be auto or one of {QUANTIZATIONS}, got {quantization!r}")
    return quantization


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               state: dict[str, torch.Tensor] | None = None, quantization: str = "none") -> LlamaModel:
    """Load a local Hugging Face Llama-family folder (or the language model of a multimodal one).
    ``state``: the folder's tensors, already read. Raises ModelLoadError with one clear line.

    quantization: "none" (the checkpoint's float weights in ``dtype``), "int4" / "int8" (base linears
    weight-only quantized at load; a folder with a GGUF source gives its own Q4 / Q8_0 blocks as
    stored), or "auto" (see ``resolve_quantization``)."""
    folder = Path(path)
    cfg = ModelConfig.from_folder(folder)
    state = load_state(folder, cfg, state)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head_weight = model.embed_tokens.weight
    model.load_hf_state(state)
    for name, t in model.named_parameters():
        # amax/amin propagate NaN and catch +-inf without allocating a mask per tensor.
        if not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            raise ModelLoadError(f"{folder}: parameter {name} holds NaN or inf")
    model = model.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        model.lm_head_weight = model.embed_tokens.weight
    mode = resolve_quantization(folder, quantization)
    if mode != "none":
        source = quantized_source(folder)
        model.quantize(mode, load_quantized_blocks(source, expected_shapes(cfg)) if source is not None else None)
    return model.eval()
