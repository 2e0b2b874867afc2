"""The CPU kernel of paged decode attention: a small C++ function compiled once and called via ctypes.

One foreign call per layer attends every decode token of the step directly over the paged cache
(no gather of each sequence's keys/values, no per-sequence Python loop). Same contract as
``paged_attention.paged_attention_torch``; ``load_library`` returns None when the kernel cannot be
built (no compiler, MOLESERVE_CPU_KERNEL=0), and the caller then uses the torch reference.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch

from kernels.cpp_build import load_cpp_library

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The kernel (compiled once, cached on disk; see kernels.cpp_build); None if unavailable."""
    lib = load_cpp_library(_SOURCE, "paged attention")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.paged_attention_cpu.argtypes = [p, p, i64, i64, i64, p, p, i64, p, p, p, i64, p, i64,
                                        ctypes.c_float, i64, ctypes.c_int]
    lib.paged_attention_cpu.restype = ctypes.c_int
    return lib


def paged_attention_cpu(lib: ctypes.CDLL, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, rows: torch.Tensor, row_seq: torch.Tensor, ctx_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float, window: int | None) -> None:
    """Fill ``out[rows]`` in place. q/out [T, H, D] fp32 contiguous; k/v_cache [blocks, BS, Hkv, D] fp32;
    rows/row_seq/ctx_lens [N] int64; block_tables [S, max_blocks] int64."""
    _, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    rc = lib.paged_attention_cpu(
        q.data_ptr(), out.data_ptr(), h, hkv, d, k_cache.data_ptr(), v_cache.data_ptr(), bs,
        rows.data_ptr(), row_seq.data_ptr(), ctx_lens.data_ptr(), rows.shape[0],
        block_tables.data_ptr(), block_tables.shape[1], scale, window or 0, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_attention_cpu failed with code {rc}")
