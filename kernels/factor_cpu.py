"""FactorLLM's sparse FFN on the CPU in one C++ call (``factor_cpu.cpp``): top-k routing, then the
chosen experts' gate/up rows, activation and down rows, for decode-sized batches where the torch
path (routing, plan, a GEMM pair per expert) costs more in dispatch than the expert GEMVs.

Same result as ``adapters.factor.kernel.factor_route`` + ``factor_ffn`` (fp32; tested equal).
``MOLESERVE_CPU_KERNEL=0`` or a missing compiler: ``factor_ffn_cpu`` returns None, callers use torch.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from kernels.cpp_build import load_cpp_library

_SOURCE = Path(__file__).with_name("factor_cpu.cpp")


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    lib = load_cpp_library(_SOURCE, "factor_ffn")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.factor_ffn_cpu.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, ctypes.c_float, p, p, ctypes.c_int]
    lib.factor_ffn_cpu.restype = ctypes.c_int
    return lib


def factor_ffn_cpu(x: Tensor, router: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int, scale: float,
                   gate_up_bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """x [T, H] -> (out [T, H] fp32, chosen experts [T, K] int64), or None when it does not apply
    (library unavailable, not fp32 / contiguous / CPU, autograd). Weights as ``factor_ffn``'s:
    router [E, H], w_gate_up [E, 2m, H], w_down [E, m, H], gate_up_bias [E, 2m] | None."""
    lib = load_library()
    tensors = (x, router, w_gate_up, w_down) + (() if gate_up_bias is None else (gate_up_bias,))
    if lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                          for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    t, h = x.shape
    e, two_m, _ = w_gate_up.shape
    out = torch.empty(t, h, dtype=torch.float32)
    chosen = torch.empty(t, top_k, dtype=torch.int64)
    rc = lib.factor_ffn_cpu(x.data_ptr(), t, h, e, two_m // 2, top_k, router.data_ptr(), w_gate_up.data_ptr(),
                            w_down.data_ptr(), None if gate_up_bias is None else gate_up_bias.data_ptr(),
                            float(scale), out.data_ptr(), chosen.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"factor_ffn_cpu failed with code {rc}")
    return out, chosen
