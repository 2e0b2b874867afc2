"""Host allocator settings for CPU serving.

A CPU step allocates and frees activations of a few MB per op (a 512-token prefill chunk's FFN
input is 6 MB). glibc serves allocations above its mmap threshold (128 KB, adapting upwards only
after frees) with fresh ``mmap``s, so every such tensor costs page faults and zeroing by the
kernel, and freed heap tops are trimmed back to the OS each time. Raising both thresholds keeps
those buffers in the heap, reused step after step, the way servers built on jemalloc/tcmalloc
behave. Measured in BENCHMARKS.md ("Engine"). ``MOLESERVE_TUNE_MALLOC=0`` leaves glibc alone; a
process whose allocator is not glibc is unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD = 256 << 20

_done = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when applied."""
    global _done
    if _done:
        return True
    if os.environ.get("MOLESERVE_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; allocator left as it is")
    _done = ok
    return ok
