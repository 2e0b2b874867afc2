"""Building blocks of a Llama-family decoder: norm, rotary embedding, and the adapter hook point."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .context import get_step_context


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        adapters = get_step_context().adapters
        if adapters is not None:
            adapters.linear(self.layer, self.targets, x, out)
        return out
