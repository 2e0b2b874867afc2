"""Building the project's small C++ CPU kernels: compiled once with g++, cached, loaded via ctypes.

Each kernel is one C++ file with a plain C ABI (no torch headers, so no torch build toolchain is
needed). The shared library is cached under ``$MOLESERVE_CACHE/kernels`` (default
``~/.cache/moleserve/kernels``), keyed on the source, the flags and the CPU's feature flags
(``-march=native`` makes the binary CPU-specific). A kernel may include the local headers
of ``kernels/`` (``#include "paged_attention_cpu.h"``, on the include path); those it includes are
part of the key, so editing a header rebuilds every kernel that uses it. ``MOLESERVE_CPU_KERNEL=0``
disables them all; callers then use their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
INCLUDE_DIR = Path(__file__).resolve().parent  # kernels/: the shared headers
_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def cache_dir() -> Path:
    root = os.environ.get("MOLESERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moleserve")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def source_bytes(source: Path) -> bytes:
    """``source`` followed by every local header it includes, recursively (each once): what the
    compiled library depends on besides the flags. A header is looked up beside the file including
    it, then in ``INCLUDE_DIR``, as the compiler does."""
    seen: set[Path] = set()
    out: list[bytes] = []

    def add(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        text = path.read_bytes()
        out.append(text)
        for name in _LOCAL_INCLUDE.findall(text):
            rel = name.decode()
            for folder in (path.parent, INCLUDE_DIR):
                if (folder / rel).is_file():
                    add(folder / rel)
                    break

    add(source)
    return b"\0".join(out)


def load_cpp_library(source: Path, what: str) -> ctypes.CDLL | None:
    """Compile ``source`` (once; concurrent builders race harmlessly) and load it; None if unavailable.

    ``what`` names the kernel in the warning logged when it cannot be built.
    """
    if os.environ.get("MOLESERVE_CPU_KERNEL", "1") == "0":
        return None
    key = hashlib.sha256(source_bytes(source) + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{source.stem}_{key}.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                tmp_so = Path(tmp) / lib_path.name
                subprocess.run([os.environ.get("CXX", "g++"), *FLAGS, f"-I{INCLUDE_DIR}", str(source), "-o", str(tmp_so)],
                               check=True, capture_output=True, timeout=120)
                os.replace(tmp_so, lib_path)  # atomic
        return ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s: C++ CPU kernel unavailable (%s); using the torch path", what, exc)
        return None
