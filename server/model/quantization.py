"""Weight-only quantized base weights: group-wise int4 and per-channel int8.

Two formats, each a module holding buffers that ``TargetLinear`` (and the LM head) calls instead of
``F.linear``; activations, norms, attention, adapters and the sampler stay in the model's dtype.

Kernels, picked once per weight at load:
- CPU: our own fp32 kernel (``kernels.quant_cpu``, ``quant_cpu.cpp``) when it builds with AVX-512: fp32
  activations in and out (no casts), scales and offsets in fp32, each output row bitwise the same
  alone or in any batch. ``compute_dtype`` is then float32.
- otherwise torch's packed kernels, which take their input in bfloat16 (``COMPUTE_DTYPE``; scales
  and offsets too) and return bfloat16, cast back: on this project's CPU torch's int4 kernel with
  float32 input runs a scalar loop 25x slower than with bfloat16 (BENCHMARKS.md, "Quantized base").
  CUDA always uses these.

- ``int4``: 4-bit codes q in [0, 15] in groups of ``group_size`` (32) consecutive input columns,
  each group with a scale s and an offset z:  w[n, k] = s[n, g] * (q[n, k] - 8) + z[n, g].
  GGUF's Q4_1 (w = d * q + m) is exactly s = d, z = m + 8 d, and Q4_0 (w = d * (q - 8)) is s = d,
  z = 0, so a GGUF file's blocks are served as they are stored (codes exact; d and m, fp16 in the
  file, kept exact in fp32 by our CPU kernel, rounded to bfloat16 for torch's). Torch kernels:
  ``aten._weight_int4pack_mm_for_cpu`` (CPU), ``aten._weight_int4pack_mm`` (CUDA).
- ``int8``: int8 codes with one scale per output row, w[n, k] = s[n] * q[n, k]. Torch kernel:
  ``aten._weight_int8pack_mm`` (CPU and CUDA). GGUF's Q8_0 (a scale per 32 columns) is
  re-quantized per row (``Int8Weight.from_groups``), which rounds each value a second time (at
  most half a row step).

Every format has ``dequantize()``, the reference its kernel is tested against (``linear`` equals
``F.linear(x, dequantize())`` up to the kernel's accumulation order). On a device or dtype where a
packed kernel is missing or disagrees with the reference on a probe input, ``linear`` falls back
to that reference (with a warning), so a quantized model always runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant_cpu

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZE = 32  # GGUF's block size; torch's int4 kernels take 32, 64, 128 or 256


_PROBED: dict[tuple, bool] = {}


def _compute_dtype(device_type: str, requested: torch.dtype | None) -> torch.dtype:
    """The activations' dtype in the kernel: bfloat16 on CUDA; on the CPU float32 where our kernel
    builds with its SIMD path, else bfloat16 (torch's kernels); an explicit request is kept on the CPU."""
    if device_type == "cuda":
        return torch.bfloat16
    if requested is not None:
        return requested
    return torch.float32 if quant_cpu.fast() else COMPUTE_DTYPE


def _cpu_kernel_applies(device_type: str, compute_dtype: torch.dtype) -> bool:
    return device_type == "cpu" and compute_dtype == torch.float32 and quant_cpu.fast()


def _probe_ok(weight: "Int4Weight | Int8Weight") -> bool:
    """The packed kernel agrees with the dequantized reference on a probe input; probed once per
    format, device, dtype and input width (what the kernel's availability and layout depend on)."""
    key = (type(weight), weight.scales.device, weight.compute_dtype, weight.in_features, weight.cpu_kernel is not None)
    if key not in _PROBED:
        _PROBED[key] = _probe(weight)
    return _PROBED[key]


def _probe(weight: "Int4Weight | Int8Weight") -> bool:
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, weight.in_features, generator=g).to(weight.scales.device, weight.compute_dtype)
        got = weight.kernel(x).float()
        want = F.linear(x.float(), weight.dequantize().float())
        tol = 1e-3 if weight.compute_dtype == torch.float32 else 2e-2
        return bool(torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().clamp(min=1).item()))
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        log.warning("%s kernel unavailable (%s); using the dequantized reference", type(weight).__name__, exc)
        return False


class Int4Weight(nn.Module):
    """A [out, in] weight as group-wise 4-bit codes (see the module docstring).

    Buffers: ``codes`` [out, in/2] (two per byte), ``packed`` (torch's layout of the codes, None on
    our CPU kernel), ``scales`` [in/g, out, 2] (s and z, in the compute dtype). ``cpu_kernel``: our
    CPU kernel's packed weight (``kernels.quant_cpu.QLinear``, a plain attribute: never moved or
    saved) or None; ``c_handle`` its C struct's address for C++ callers.
    ``linear(x)``: x [T, in] -> [T, out].
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                 compute_dtype: torch.dtype | None = None):
        """codes int [out, in] in [0, 15]; scale, zero [out, in / group_size]."""
        super().__init__()
        out_features, in_features = codes.shape
        if in_features % group_size or scale.shape != (out_features, in_features // group_size) or scale.shape != zero.shape:
            raise ValueError(f"int4: {tuple(codes.shape)} codes need [out, in/{group_size}] scales, "
                             f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.device_type = codes.device.type
        self.compute_dtype = _compute_dtype(self.device_type, compute_dtype)
        codes = codes.to(torch.uint8)
        # the codes two per byte (even column low) for dequantize(): the kernels' layouts are opaque
        self.register_buffer("codes", (codes[:, 0::2] | codes[:, 1::2] << 4).contiguous())
        self.register_buffer("scales", torch.stack([scale.t(), zero.t()], dim=-1).to(self.compute_dtype).contiguous())
        self.cpu_kernel = None
        if _cpu_kernel_applies(self.device_type, self.compute_dtype):
            self.cpu_kernel = quant_cpu.pack_int4(self.codes, scale.float(), zero.float(), group_size)
        packed = None
        if self.cpu_kernel is None:
            try:
                packed = self._pack(codes)
            except RuntimeError as exc:  # a shape the kernel does not take (CPU: out % 16, CUDA: in % 32)
                log.warning("int4 weight %dx%d not packed (%s); using the dequantized reference",
                            out_features, in_features, str(exc).splitlines()[0])
        self.register_buffer("packed", packed)
        self.use_kernel = (packed is not None or self.cpu_kernel is not None) and _probe_ok(self)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cuda":
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [out, in/2], high nibble first
            return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8 if self.in_features % 1024 == 0 else 2)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
                 compute_dtype: torch.dtype | None = None) -> "Int4Weight":
        """Round-to-nearest asymmetric quantization of a float [out, in] weight: each group's min and
        max map to codes 0 and 15 (as GGUF's Q4_1 does)."""
        w = weight.detach().float()
        out_features, in_features = w.shape
        if in_features % group_size:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of the group size {group_size}")
        groups = w.reshape(out_features, in_features // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(out_features, in_features)
        return cls(codes, scale, lo + 8 * scale, group_size, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in] the codes stand for (fp32)."""
        codes = torch.stack([self.codes & 0xF, self.codes >> 4], dim=-1).reshape(self.out_features, self.in_features)
        s, z = self.scales.float().unbind(-1)  # [in/g, out]
        s = s.t().repeat_interleave(self.group_size, dim=1)
        z = z.t().repeat_interleave(self.group_size, dim=1)
        return (codes.float() - 8) * s + z

    @property
    def c_handle(self) -> int | None:
        """The address of our CPU kernel's weight struct (``ms_qlinear``'s ``weight``), or None."""
        return None if self.cpu_kernel is None else self.cpu_kernel.c_handle

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel is not None:
            return self.cpu_kernel(x)
        if self.device_type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)

    def nbytes(self) -> int:
        """Bytes the kernel reads: its packed codes and the scales."""
        if self.cpu_kernel is not None:
            return self.cpu_kernel.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales) if t is not None)


class Int8Weight(nn.Module):
    """A [out, in] weight as int8 codes with one scale per output row: w = scales[n] * codes[n, k].

    Buffers: ``codes`` int8 [out, in], ``scales`` [out] (compute dtype); ``cpu_kernel`` and
    ``c_handle`` as ``Int4Weight``'s. ``linear(x)``: x [T, in] -> [T, out].
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.device_type = codes.device.type
        self.compute_dtype = _compute_dtype(self.device_type, compute_dtype)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(self.compute_dtype).contiguous())
        self.cpu_kernel = None
        if _cpu_kernel_applies(self.device_type, self.compute_dtype):
            self.cpu_kernel = quant_cpu.pack_int8(self.codes, self.scales)
        self.use_kernel = _probe_ok(self)

    @classmethod
    def quantize(cls, weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> "Int8Weight":
        """Symmetric round-to-nearest per output row (absmax -> 127)."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        return cls((w / scales[:, None]).round().clamp(-127, 127), scales, compute_dtype)

    @classmethod
    def from_groups(cls, codes: torch.Tensor, scales: torch.Tensor) -> "Int8Weight":
        """From group-wise int8 (GGUF Q8_0: codes [out, in], scales [out, in / g]) by way of its exact
        float values."""
        g = codes.shape[1] // scales.shape[1]
        return cls.quantize(codes.float() * scales.float().repeat_interleave(g, dim=1))

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float()[:, None]

    @property
    def c_handle(self) -> int | None:
        return None if self.cpu_kernel is None else self.cpu_kernel.c_handle

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel is not None:
            return self.cpu_kernel(x)
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)

    def nbytes(self) -> int:
        if self.cpu_kernel is not None:
            return self.cpu_kernel.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


def _linear(weight: Int4Weight | Int8Weight, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> [T, out] in x's dtype: the packed kernel in the compute dtype, or (no kernel)
    the dequantized reference with the same roundings of input and output."""
    if weight.cpu_kernel is not None and weight.use_kernel:  # fp32 in and out: no casts
        return weight.cpu_kernel(x) if x.dtype == torch.float32 else weight.cpu_kernel(x).to(x.dtype)
    xc = x.to(weight.compute_dtype).contiguous()
    y = weight.kernel(xc) if weight.use_kernel else F.linear(xc.float(), weight.dequantize()).to(weight.compute_dtype)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def quantize_weight(weight: torch.Tensor, mode: str) -> Int4Weight | Int8Weight:
    """A float [out, in] weight in ``mode`` ("int4" or "int8"), on the weight's device."""
    if mode == "int4":
        return Int4Weight.quantize(weight)
    if mode == "int8":
        return Int8Weight.quantize(weight)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS[1:]}, got {mode!r}")


def from_gguf_blocks(parts: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> Int4Weight | Int8Weight:
    """One weight from GGUF blocks (``server.model.weights.read_gguf_quantized`` values), several
    stacked along the output rows (fused q|k|v, gate|up). All Q4_0 / Q4_1: int4 as stored; all Q8_0:
    int8 per row (see ``Int8Weight.from_groups``)."""
    kinds = {p[0] for p in parts}
    codes = torch.cat([p[1] for p in parts])
    scale = torch.cat([p[2] for p in parts])
    if kinds <= {"q4_0", "q4_1"}:
        zero = torch.cat([torch.zeros_like(s) if m is None else m + 8 * s for _, _, s, m in parts])
        return Int4Weight(codes, scale, zero, codes.shape[1] // scale.shape[1])
    if kinds == {"q8_0"}:
        return Int8Weight.from_groups(codes, scale)
    raise ValueError(f"cannot stack GGUF blocks of kinds {sorted(kinds)} into one weight")
