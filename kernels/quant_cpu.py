"""Weight-only int4 / int8 linear for the CPU in fp32 (``quant_cpu.cpp``), through ctypes.

    y [M, N] = x [M, K] @ W^T (+ bias)      x, y fp32; W packed once at load (``pack_int4``, ``pack_int8``)

- int4: w[n, k] = s[n, g] * (q[n, k] - 8) + z[n, g], q in [0, 15], groups of ``group`` input columns
  (any even size dividing K: 32, 64, 128), s and z fp32.
- int8: w[n, k] = s[n] * q[n, k], q in [-127, 127], s fp32.

Each output is one fixed chain of fmas over k, so a row's result is bitwise the same alone, in any
batch and with any thread count (threads split the output columns). Reference: ``F.linear(x,
dequantize())`` of the weight formats in ``server.model.quantization`` (tested equal to fp32 rounding).

Other C++ code calls the same kernel per linear through a function pointer: ``qlinear_fn_address()``
is the address of ``void ms_qlinear(const void* weight, const float* x, int64_t M, float* y, int
nthreads)`` and ``QLinear.c_handle`` the address of the ``weight`` struct (``QWeightStruct``).

``MOLESERVE_CPU_KERNEL=0`` or no compiler: ``available()`` is False and the pack functions return
None; callers then use torch's packed kernels, as they do where ``fast()`` is False (no AVX-512).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from kernels.cpp_build import load_cpp_library

_SOURCE = Path(__file__).with_name("quant_cpu.cpp")
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class QWeightStruct(ctypes.Structure):  # quant_cpu.cpp QWeight
    _fields_ = [("kind", ctypes.c_int32), ("group", ctypes.c_int32), ("n", _I64), ("k", _I64),
                ("codes", _P), ("scales", _P), ("bias", _P)]


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    lib = load_cpp_library(_SOURCE, "quant_cpu")
    if lib is None:
        return None
    lib.ms_qpack_bytes.argtypes = [_INT, _I64, _I64, _INT]
    lib.ms_qpack_bytes.restype = _I64
    lib.ms_qpack_int4.argtypes = [_P, _P, _P, _I64, _I64, _INT, _P, _P]
    lib.ms_qpack_int4.restype = _INT
    lib.ms_qpack_int8.argtypes = [_P, _P, _I64, _I64, _P, _P]
    lib.ms_qpack_int8.restype = _INT
    lib.ms_qlinear.argtypes = [_P, _P, _I64, _P, _INT]
    lib.ms_qlinear.restype = None
    lib.ms_qlinear_simd.argtypes = []
    lib.ms_qlinear_simd.restype = _INT
    return lib


def available() -> bool:
    return load_library() is not None


def fast() -> bool:
    """The library is built with its SIMD schedules (AVX-512); without them it computes the same
    with a portable scalar loop, slower than torch's bf16 kernels, which callers then prefer."""
    lib = load_library()
    return lib is not None and lib.ms_qlinear_simd() == 1


def qlinear_fn_address() -> int | None:
    """The address of ``ms_qlinear`` (for C++ callers), or None when the library is unavailable."""
    lib = load_library()
    return None if lib is None else ctypes.cast(lib.ms_qlinear, ctypes.c_void_p).value


class QLinear:
    """One packed weight: the opaque buffer (uint8, 64-byte aligned) and the C struct pointing into it.

    Holds everything the struct points to, so ``c_handle`` stays valid as long as this object lives.
    """

    def __init__(self, lib: ctypes.CDLL, kind: int, out_features: int, in_features: int, group: int):
        self._lib = lib
        self.out_features, self.in_features = out_features, in_features
        self.buffer = _aligned_bytes(lib.ms_qpack_bytes(kind, out_features, in_features, group))
        self.struct = QWeightStruct()
        self.bias: Tensor | None = None
        self._handle, self._fn = ctypes.addressof(self.struct), lib.ms_qlinear

    def __getstate__(self) -> dict:  # copy.deepcopy and pickle: the struct's pointers are rebuilt
        s = self.struct
        return {"kind": s.kind, "group": s.group, "n": s.n, "k": s.k, "buffer": self.buffer,
                "scales_at": s.scales - s.codes, "bias": self.bias}

    def __setstate__(self, state: dict) -> None:
        lib = load_library()
        if lib is None:
            raise RuntimeError("quant_cpu: the kernel library is unavailable")
        self._lib = lib
        self.out_features, self.in_features = state["n"], state["k"]
        self.buffer = _aligned_bytes(state["buffer"].numel())
        self.buffer.copy_(state["buffer"])
        base = self.buffer.data_ptr()
        self.struct = QWeightStruct(state["kind"], state["group"], state["n"], state["k"], base,
                                    base + state["scales_at"], None)
        self._handle, self._fn = ctypes.addressof(self.struct), lib.ms_qlinear
        self.set_bias(state["bias"])

    @property
    def c_handle(self) -> int:
        return self._handle

    def set_bias(self, bias: Tensor | None) -> None:
        """Add ``bias`` [N] (fp32, kept by this object) to every output row; None: no bias."""
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous().clone()
        self.struct.bias = None if self.bias is None else self.bias.data_ptr()

    def nbytes(self) -> int:
        return self.buffer.numel()

    def __call__(self, x: Tensor) -> Tensor:
        """x [M, K] fp32 -> [M, N] fp32 (any leading shape is flattened and restored)."""
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():  # the decode path skips this
            lead = x.shape[:-1]
            return self(x.reshape(-1, self.in_features).to(torch.float32).contiguous()).reshape(*lead, self.out_features)
        y = torch.empty(x.shape[0], self.out_features)
        self._fn(self._handle, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
        return y


def _aligned_bytes(nbytes: int) -> Tensor:
    """A uint8 tensor of ``nbytes`` starting on a 64-byte boundary (a view that keeps its base alive)."""
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)
    start = -raw.data_ptr() % 64
    return raw[start:start + nbytes]


def pack_int4(codes: Tensor, scale: Tensor, zero: Tensor, group: int, lib: ctypes.CDLL | None = None) -> QLinear | None:
    """codes uint8 [N, K/2] (two per byte, even column in the low nibble), scale and zero [N, K/group]
    (w = scale * (q - 8) + zero) -> the packed weight, or None (library unavailable, shape refused).
    ``lib``: another build of ``quant_cpu.cpp`` (tests of its portable path); default ``load_library()``."""
    lib = lib or load_library()
    if lib is None:
        return None
    n, half = codes.shape
    q = QLinear(lib, 4, n, 2 * half, group)
    codes = codes.to(torch.uint8).contiguous()
    scale, zero = (t.to(torch.float32).contiguous() for t in (scale, zero))
    rc = lib.ms_qpack_int4(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, 2 * half, group,
                           q.buffer.data_ptr(), q.c_handle)
    return q if rc == 0 else None


def pack_int8(codes: Tensor, scales: Tensor, lib: ctypes.CDLL | None = None) -> QLinear | None:
    """codes int8 [N, K], scales [N] (w = scales[n] * q) -> the packed weight, or None."""
    lib = lib or load_library()
    if lib is None:
        return None
    n, k = codes.shape
    q = QLinear(lib, 8, n, k, 0)
    codes = codes.to(torch.int8).contiguous()
    scales = scales.to(torch.float32).contiguous()
    rc = lib.ms_qpack_int8(codes.data_ptr(), scales.data_ptr(), n, k, q.buffer.data_ptr(), q.c_handle)
    return q if rc == 0 else None
