"""Bank loading that cannot hurt the other tenants (issue #19): a memory budget for loaded banks,
a bounded set of load threads with a deadline, and a FIFO that is refused instead of hanging."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import adapters.runtime.registry as registry_module
from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankLoadError, BankLoadUnavailable, BankOverBudget
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank


def _saved(model_dir, folder, name="b", seed=0):
    random_bank("dynmole", fingerprint_of(model_dir), r=4, experts_per_layer=(3,), seed=seed, name=name).save(folder)
    return folder


def test_memory_budget_refuses_with_409_naming_it(tmp_path, tiny_model_dir):
    probe = BankRegistry(ModelConfig.from_folder(tiny_model_dir), allowed_roots=[tmp_path])
    one = probe.load_sync("one", _saved(tiny_model_dir, tmp_path / "one"))["bytes"]
    reg = BankRegistry(ModelConfig.from_folder(tiny_model_dir), allowed_roots=[tmp_path], memory_bytes=int(one * 1.5))
    reg.load_sync("one", tmp_path / "one")
    with pytest.raises(BankOverBudget, match="--bank-memory") as info:
        reg.load_sync("two", _saved(tiny_model_dir, tmp_path / "two", seed=1))
    assert info.value.status == 409
    assert [b["name"] for b in reg.list()] == ["one"]
    reg.unload_sync("one")
    reg.load_sync("two", tmp_path / "two")  # room again once a bank is unloaded


def test_a_fifo_is_refused_through_the_registry(tmp_path, tiny_model_dir):
    folder = _saved(tiny_model_dir, tmp_path / "f")
    (folder / "weights.safetensors").unlink()
    os.mkfifo(folder / "weights.safetensors")
    reg = BankRegistry(ModelConfig.from_folder(tiny_model_dir), allowed_roots=[tmp_path], load_timeout=10)
    t0 = time.monotonic()
    with pytest.raises(BankLoadError, match="not a regular file"):
        asyncio.run(reg.load("f", folder))
    assert time.monotonic() - t0 < 5


def test_stuck_loads_time_out_use_bounded_workers_and_never_swap_in(tmp_path, tiny_model_dir, monkeypatch):
    folder = _saved(tiny_model_dir, tmp_path / "s")
    release = threading.Event()
    real = registry_module.load_bank

    def stuck(path, **kw):  # a load stuck on its files (what a FIFO did before it was refused)
        release.wait(30)
        return real(path, **kw)

    monkeypatch.setattr(registry_module, "load_bank", stuck)
    reg = BankRegistry(ModelConfig.from_folder(tiny_model_dir), allowed_roots=[tmp_path], load_workers=1,
                       load_timeout=0.3)

    async def scenario():
        with pytest.raises(BankLoadUnavailable, match="did not finish within 0.3 seconds") as timeout:
            await reg.load("s", folder)
        assert timeout.value.status == 504
        t0 = time.monotonic()
        with pytest.raises(BankLoadUnavailable, match="busy") as busy:  # the one worker is still stuck
            await reg.load("s2", folder)
        assert busy.value.status == 503 and time.monotonic() - t0 < 0.2

    asyncio.run(scenario())
    stuck_threads = [t for t in threading.enumerate() if t.name.startswith("bank-load-")]
    assert stuck_threads and all(t.daemon for t in stuck_threads)  # never holds the process at exit
    release.set()
    for t in stuck_threads:
        t.join(20)
    assert reg.list() == []  # the given-up load did not swap its bank in later
    monkeypatch.setattr(registry_module, "load_bank", real)
    assert asyncio.run(reg.load("s", folder))["name"] == "s"  # its worker is free again
