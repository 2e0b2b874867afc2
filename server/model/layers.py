"""Building blocks of a Llama-family decoder: norm, rotary embedding, and the adapter hook point."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .context import get_step_context
from .quantization import Int4Weight, Int8Weight, quantize_weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op instead of seven (61 norms per step)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Same op order as transformers' LlamaRMSNorm: normalise in fp32, cast, then scale.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; every RoPE variant transformers knows (linear, llama3, yarn, ...)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf = cfg.hf_config()
        params = getattr(hf, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", cfg.raw.get("rope_theta", 10000.0))
            dim = cfg.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        elif rope_type == "dynamic":
            # Dynamic NTK rescales with the sequence length seen so far; a paged server cannot
            # re-rotate cached keys, so it is refused rather than silently approximated.
            from .errors import ModelLoadError

            raise ModelLoadError("config.json: rope_type 'dynamic' is not supported (cached keys cannot be re-rotated)")
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                from .errors import ModelLoadError

                raise ModelLoadError(f"config.json: unknown rope_type {rope_type!r}")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        # A plain attribute, not a buffer: it must stay fp32 whatever dtype the model is cast to,
        # and survive ``to_empty`` when the model is materialised from the meta device.
        self.inv_freq = inv_freq.float()
        self.scaling = float(scaling)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        self.inv_freq = self.inv_freq.to(probe.device)
        return super()._apply(fn, recurse)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, head_dim]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D] -> x rotated (rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] reordered into oneDNN's blocked layout for CPU fp32 inference, or None
    where that path is unavailable (not CPU fp32, a build without oneDNN, ``MOLESERVE_PACKED_WEIGHTS=0``).

    On CPU, MKL's sgemm on a row-major [out, in] weight runs small-M GEMMs (decode steps) far below
    the machine's rate. On this project's 2-core VM (SmolLM2's shapes, weights hot in cache) oneDNN's
    prepacked weight ran each linear 1.1-2.2x faster at M = 8-96 and the LM head 2.6x at M = 32; at
    M = 1 the small q/k/v and o linears were ~1.5x slower but a whole step still faster (30 -> 24 ms),
    and at M = 512 within a few percent. The packed copy is an opaque tensor beside the plain one.
    """
    import os

    if os.environ.get("MOLESERVE_PACKED_WEIGHTS", "1") == "0":
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)
        probe = torch.ones(1, weight.shape[1])
        if not torch.allclose(packed_linear(probe, packed, None), probe @ weight.detach().t(), rtol=1e-4, atol=1e-4):
            return None
        return packed
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class TargetLinear(nn.Module):
    """A base linear made of one or more adapter targets fused into one GEMM, plus the hook point.

    ``targets`` names the fused parts in output order, e.g. ("q_proj", "k_proj", "v_proj") with
    ``sizes`` (q, kv, kv). After the base matmul, the step's adapters (if any) add their deltas to
    the output in place — one call per fused linear per step, for every bank in the batch at once.

    x: [T, in] -> [T, sum(sizes)]
    """

    def __init__(self, layer: int, targets: tuple[str, ...], in_features: int, sizes: tuple[int, ...], bias: bool):
        super().__init__()
        self.layer = layer
        self.targets = targets
        self.sizes = sizes
        self.in_features = in_features
        self.out_features = sum(sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        # Inference-only copy of ``weight`` in the CPU GEMM's preferred layout (``LlamaModel.pack_weights``);
        # a plain attribute so it is neither saved nor moved, and stale if ``weight`` is edited after.
        self.packed: torch.Tensor | None = None
        # The weight in a quantized format (``quantize``); then ``weight`` is None.
        self.quant: Int4Weight | Int8Weight | None = None

    def quantize(self, mode: str) -> None:
        """Replace the float weight by its ``mode`` ("int4", "int8") quantization (weight-only)."""
        self.set_quantized(quantize_weight(self.weight, mode))

    def set_quantized(self, quant: Int4Weight | Int8Weight) -> None:
        if (quant.out_features, quant.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight {quant.out_features}x{quant.in_features} does not fit "
                             f"{self.out_features}x{self.in_features}")
        self.quant = quant
        self.weight = None
        self.packed = None

    def dense_weight(self) -> torch.Tensor:
        """The float weight [out, in]: ``weight``, or what the quantized one stands for (fp32)."""
        return self.weight if self.quant is None else self.quant.dequantize()

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The base GEMM alone: x [T, in] -> [T, out]."""
        if self.quant is not None:
            out = self.quant.linear(x)
            return out if self.bias is None else out.add_(self.bias)
        if self.packed is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            return packed_linear(x.contiguous(), self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def c_linear(self) -> tuple[int, int] | None:
        """(address of a C ``ms_linear_fn``, address of its weight handle) computing ``base`` without
        the bias (``y [M, out] = x [M, in] @ W^T``) for the fused decode forward (``fused_decode.py``);
        None when no C kernel serves this weight's format. A quantized weight is served by its own
        format's kernel (``c_handle`` and ``kernels.quant_cpu.qlinear_fn_address``), a CPU fp32
        weight by ``ms_f32linear``."""
        if self.quant is not None:
            handle = getattr(self.quant, "c_handle", None)
            if handle is None or not getattr(self.quant, "use_kernel", True):  # no kernel, or it failed its probe
                return None
            try:
                from kernels.quant_cpu import qlinear_fn_address  # noqa: PLC0415
            except ImportError:
                return None
            fn = qlinear_fn_address()
            return None if not fn else (fn, handle)
        from .fused_decode import f32_linear  # noqa: PLC0415

        # one handle per weight storage: every caller gets the same address, and the handle keeps the
        # storage it points into alive (a weight moved by ``.to()`` gets a new one)
        cached = getattr(self, "_c_weight", None)
        if cached is None or cached[0].data_ptr() != self.weight.data_ptr():
            weight = self.weight.detach()
            found = f32_linear(weight)
            if found is None:
                return None
            cached = self._c_weight = (weight, *found)
        return cached[1], ctypes.addressof(cached[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        adapters = get_step_context().adapters
        if adapters is not None:
            adapters.linear(self.layer, self.targets, x, out)
        return out
