"""The first-run bank is trained once, atomically, into the cache and then found there."""

from __future__ import annotations

import json

from adapters import load_bank
from adapters.train import first_run

from .conftest import RECORDS


def test_first_run_bank_is_trained_once(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for s in first_run.SETS[:2]:
        (data / s).mkdir(parents=True)
        (data / s / "train.json").write_text(json.dumps(RECORDS * 3))
    monkeypatch.setenv("MOLESERVE_COMMONSENSE_DATA", str(data))
    cache = tmp_path / "cache"
    path = first_run.ensure_first_run_bank(cache, model=str(tiny_model_dir), max_seconds=2)
    assert path == cache / "banks" / "commonsense-dynmole"
    bank = load_bank(path)
    assert bank.kind == "dynmole" and bank.name == "commonsense-dynmole" and bank.num_experts() == 4
    assert not (path / "checkpoint.pt").exists()
    assert [p.name for p in (cache / "banks").iterdir() if not p.name.endswith(".lock")] == ["commonsense-dynmole"]
    mtime = (path / "bank.json").stat().st_mtime
    assert first_run.ensure_first_run_bank(cache, model=str(tiny_model_dir)) == path
    assert (path / "bank.json").stat().st_mtime == mtime
