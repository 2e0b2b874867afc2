"""The CPU engine raises glibc's mmap/trim thresholds once (server/engine/host_memory.py)."""

import platform
import subprocess
import sys

import pytest

CHECK = ("import ctypes, sys; from server.engine.host_memory import tune_malloc; "
         "r = tune_malloc(); print(r, tune_malloc())")


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
@pytest.mark.parametrize("env,expected", [({}, "True True"), ({"MOLESERVE_TUNE_MALLOC": "0"}, "False False")])
def test_tune_malloc_applies_once_or_not_at_all(env, expected, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
