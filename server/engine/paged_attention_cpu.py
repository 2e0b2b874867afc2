"""The CPU kernel of paged decode attention: a small C++ function compiled once and called via ctypes.

One foreign call per layer attends every decode token of the step directly over the paged cache
(no gather of each sequence's keys/values, no per-sequence Python loop). Same contract as
``paged_attention.paged_attention_torch``; ``load_library`` returns None when the kernel cannot be
built (no compiler, MOLESERVE_CPU_KERNEL=0), and the caller then uses the torch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cache_dir() -> Path:
    root = os.environ.get("MOLESERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moleserve")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    # -march=native makes the binary CPU-specific: key the cache on the CPU's feature flags.
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """Compile (once per source/flags/CPU, cached on disk) and load the kernel; None if unavailable."""
    if os.environ.get("MOLESERVE_CPU_KERNEL", "1") == "0":
        return None
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"paged_attention_cpu_{key}.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                tmp_so = Path(tmp) / lib_path.name
                subprocess.run([os.environ.get("CXX", "g++"), *_FLAGS, str(_SOURCE), "-o", str(tmp_so)],
                               check=True, capture_output=True, timeout=120)
                os.replace(tmp_so, lib_path)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("paged attention: C++ CPU kernel unavailable (%s); using the torch reference", exc)
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
