"""One OpenMP team per server process: the step thread's.

torch's CPU kernels run on OpenMP. libgomp keeps a pool of worker threads for every thread that
has ever started a parallel region, and when the process holds more pool threads than it has
CPUs it stops spinning between regions: every worker then sleeps after each op and is woken by a
futex at the next one. A server that loads its model on one thread (the main thread, or a worker
of ``asyncio.to_thread``) and steps on another has two pools, so on a 2-core machine every one of
a decode step's ~4,600 small ops paid a sleep and a wake-up. Measured over HTTP (32 concurrent
streams, 64 tokens): the step thread's OpenMP worker went to sleep ~2,000 times a second and ran
at 67% of a core, against 100% and no sleeps in-process; the served throughput was 0.72-0.81x the
in-process engine's (BENCHMARKS.md, "Served throughput").

So the thread that built the engine hands its pool back (``omp_pause_resource_all``, OpenMP 5.0)
and every thread but the step thread runs torch single-threaded: the step thread is the only one
with a team, of the size the engine was built with.
"""

from __future__ import annotations

import ctypes
import logging
import re

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIME: ctypes.CDLL | None | bool = False  # False: not looked up yet


def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp, libiomp5 or libomp), or None."""
    global _RUNTIME
    if _RUNTIME is False:
        _RUNTIME = None
        try:
            with open("/proc/self/maps") as maps:
                paths = sorted(set(re.findall(r"(/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)", maps.read())))
            for path in paths:
                lib = ctypes.CDLL(path)
                if hasattr(lib, "omp_pause_resource_all"):
                    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                    _RUNTIME = lib
                    break
        except OSError as exc:  # no /proc (not Linux): nothing to release
            log.debug("OpenMP runtime not found: %s", exc)
    return _RUNTIME


def release_thread_pool() -> bool:
    """Hand back the calling thread's OpenMP worker threads (they are re-created if it starts a
    parallel region again); True when the runtime did."""
    lib = openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def own_thread_count(n: int) -> None:
    """Give the calling thread ``n`` intra-op threads, fixed now: torch applies its process-wide
    setting to a thread at the thread's first parallel op, so that op runs here, before any other
    thread changes the setting."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # applies the process-wide setting to this thread now: its count is its own


def single_threaded_elsewhere() -> None:
    """The calling thread (the one that built the engine) gives its OpenMP pool back and, like every
    thread started from now on, runs torch on one thread."""
    release_thread_pool()
    torch.set_num_threads(1)
