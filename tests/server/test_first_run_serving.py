"""`moleserve serve --first-run-bank`: the bank is prepared in a child process and hot-loaded."""

from __future__ import annotations

import time

from adapters.runtime import BankRegistry
from server.commands.serve import start_first_run_bank
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank


def test_cached_first_run_bank_is_loaded_in_the_background(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLESERVE_CACHE", str(cache))
    bank = random_bank("dynmole", fingerprint_of(tiny_model_dir), r=4, experts_per_layer=(4, 4), seed=1,
                       name="commonsense-dynmole")
    bank.save(cache / "banks" / "commonsense-dynmole")  # already trained: the child only finds it
    registry = BankRegistry(ModelConfig.from_folder(tiny_model_dir))
    start_first_run_bank(registry, str(tiny_model_dir))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not registry.list():
        time.sleep(0.2)
    [info] = registry.list()
    assert info["name"] == "commonsense-dynmole" and info["kind"] == "dynmole"


def test_a_failed_first_run_bank_leaves_the_registry_empty(tiny_model_dir, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLESERVE_CACHE", str(cache))
    monkeypatch.setenv("MOLESERVE_COMMONSENSE_DATA", str(tmp_path / "no-data"))  # training fails at once
    registry = BankRegistry(ModelConfig.from_folder(tiny_model_dir))
    with caplog.at_level("ERROR", logger="moleserve.serve"):
        start_first_run_bank(registry, str(tiny_model_dir))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "first-run bank" not in caplog.text:
            time.sleep(0.2)
    assert "training failed" in caplog.text and "no commonsense train sets" in caplog.text
    assert registry.list() == []
