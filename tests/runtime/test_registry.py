"""The registry: versions, refcounts, the pool's memory budget, eviction, refusals, --banks."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import pytest
import torch

from adapters.runtime import BankAdminError, BankNotFound, BankRegistry
from server.engine.protocol import UnknownBank
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank, write_mixlora, write_peft_lora, write_plugin_moe
from tests.runtime.helpers import flat_logits


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from server.model import load_model

    return load_model(tiny_model_dir)


def _bank(model_dir, name, seed=0, kind="dynmole"):
    return random_bank(kind, fingerprint_of(model_dir), r=4, experts_per_layer=(3,), seed=seed, name=name)


def _snapshot(reg: BankRegistry):
    return reg.list(), reg.pool.slots_used, reg.pool.capacity, len(reg._live)


def test_versions_and_refcounts(tiny_model_dir, tiny_config):
    reg = BankRegistry(tiny_config)
    reg.add(_bank(tiny_model_dir, "a"))
    h1 = reg.acquire("a")
    reg.add(_bank(tiny_model_dir, "a", seed=1))  # replace
    h2 = reg.acquire("a")
    assert (h1.version, h2.version) == (1, 2)
    assert reg.pool.slots_used == 6  # both versions resident while h1 runs
    step = reg.build_step([h1, None, h2], [2, 1, 3])
    assert [b.offset for b in step.banks] == [h1.bank.offset, h2.bank.offset]
    assert step.token_bank.tolist() == [0, 0, -1, 1, 1, 1]
    reg.release(h1)
    reg.release(h1)  # idempotent
    assert reg.pool.slots_used == 3
    reg.unload_sync("a")
    with pytest.raises(UnknownBank):
        reg.acquire("a")
    assert h2.bank.offset is not None  # still pinned by h2
    reg.release(h2)
    assert reg.pool.slots_used == 0 and reg.list() == []
    with pytest.raises(BankNotFound):
        reg.unload_sync("a")
    assert reg.build_step([None, None], [1, 1]) is None


def test_budget_evicts_idle_lru_and_restores_on_demand(tiny_model_dir, tiny_config, tiny_model):
    probe = BankRegistry(tiny_config)
    probe.add(_bank(tiny_model_dir, "x"))
    per_bank = probe.pool.bytes_per_slot() * 3
    reg = BankRegistry(tiny_config, pool_memory_bytes=int(per_bank * 2.5))  # room for 2 banks
    for i, name in enumerate("abc"):
        reg.add(_bank(tiny_model_dir, name, seed=i))
    resident = {b["name"]: b["resident"] for b in reg.list()}
    assert resident == {"a": False, "b": True, "c": True}  # "a" was least recently used
    assert reg.pool.nbytes() <= reg.pool_memory_bytes
    prompt = [torch.arange(5)]
    before = flat_logits(tiny_model, BankRegistry(tiny_config, allowed_roots=[]), prompt, [None])
    reference = BankRegistry(tiny_config)
    reference.add(_bank(tiny_model_dir, "a", seed=0))
    want = flat_logits(tiny_model, reference, prompt, ["a"])[0]
    got = flat_logits(tiny_model, reg, prompt, ["a"])[0]  # comes back from host memory
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, before[0])
    resident = {b["name"]: b["resident"] for b in reg.list()}
    assert resident["a"] and sum(resident.values()) == 2
    # banks with requests in flight are never evicted; a step that needs more grows past the budget
    handles = [reg.acquire(n) for n in "abc"]
    step = reg.build_step(handles, [1, 1, 1])
    assert len({b.offset for b in step.banks}) == 3 and reg.over_budget
    for h in handles:
        reg.release(h)


def test_mixed_ranks_and_pool_growth(tiny_model_dir, tiny_config, tiny_model):
    fp = fingerprint_of(tiny_model_dir)
    reg = BankRegistry(tiny_config)
    banks = [random_bank("mola", fp, r=r, experts_per_layer=(2, 3), seed=r, name=f"m{r}") for r in (2, 8, 4)]
    alone = []
    for b in banks:
        solo = BankRegistry(tiny_config)
        solo.add(b)
        alone.append(flat_logits(tiny_model, solo, [torch.arange(6)], [b.name])[0])
        reg.add(b)
    assert reg.pool.state.rank == 8
    got = flat_logits(tiny_model, reg, [torch.arange(6)] * 3, [b.name for b in banks])
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, atol=1e-4, rtol=1e-4)


def _write_good(kind: str, folder, model_dir):
    fp = fingerprint_of(model_dir)
    if kind == "lora":
        write_peft_lora(folder, fp)
    elif kind == "mixlora":
        write_mixlora(folder, fp, fmt="safetensors")
    else:
        write_plugin_moe(folder, fp, kind=kind, fmt="safetensors")


def _break(case: str, root, model_dir):
    """A folder under ``root`` (or a path) that must be refused, and a word the error must contain."""
    folder = root / case
    if case == "missing":
        folder.mkdir()
        return folder, "neither"
    if case == "truncated":
        write_peft_lora(folder, fingerprint_of(model_dir))
        f = folder / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return folder, "adapter_model.safetensors"
    if case == "truncated_bin":
        write_mixlora(folder, fingerprint_of(model_dir), fmt="bin")
        f = folder / "adapter_model.bin"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        return folder, "adapter_model.bin"
    if case == "shapes":
        write_peft_lora(folder, fingerprint_of(model_dir))
        from safetensors.torch import load_file, save_file
        t = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in t if "lora_A" in k)
        t[key] = t[key][:, :-1].contiguous()
        save_file(t, folder / "adapter_model.safetensors")
        return folder, "shape"
    if case == "other_base":
        from tests.adapters.bank_builders import TINY
        write_peft_lora(folder, TINY.__class__(**{**TINY.to_dict(), "hidden_size": 32, "vocab_size": 999}))
        return folder, "adapter_model.safetensors"
    if case == "nan":
        write_peft_lora(folder, fingerprint_of(model_dir))
        from safetensors.torch import load_file, save_file
        t = load_file(folder / "adapter_model.safetensors")
        key = next(iter(t))
        t[key][0, 0] = float("nan")
        save_file(t, folder / "adapter_model.safetensors")
        return folder, "nan"
    if case == "unknown_kind":
        write_peft_lora(folder, fingerprint_of(model_dir))
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["peft_type"] = "IA3"
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder, "ia3"
    if case == "dotdot":
        write_peft_lora(root.parent / "elsewhere", fingerprint_of(model_dir))
        return root / ".." / "elsewhere", "outside"
    if case == "symlink":
        outside = root.parent / "outside-bank"
        write_peft_lora(outside, fingerprint_of(model_dir))
        os.symlink(outside, folder)
        return folder, "outside"
    if case == "pickle":
        write_mixlora(folder, fingerprint_of(model_dir), fmt="bin")

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {root}/pwned",))

        with open(folder / "adapter_model.bin", "wb") as fh:
            pickle.dump({"x": Evil()}, fh)
        return folder, "adapter_model.bin"
    raise AssertionError(case)


CASES = ("missing", "truncated", "truncated_bin", "shapes", "other_base", "nan", "unknown_kind", "dotdot", "symlink",
         "pickle")


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_and_leaves_nothing(tmp_path, tiny_model_dir, tiny_config, tiny_model, case):
    root = tmp_path / "banks"
    root.mkdir()
    reg = BankRegistry(tiny_config, allowed_roots=[root])
    _write_good("dynmole", root / "good", tiny_model_dir)
    reg.load_sync("good", root / "good")
    before = _snapshot(reg)
    path, word = _break(case, root, tiny_model_dir)
    with pytest.raises(BankAdminError) as err:
        asyncio.run(reg.load("bad", path))
    msg = str(err.value)
    assert word.lower() in msg.lower(), msg
    assert err.value.status in (400, 403, 404, 422)
    assert _snapshot(reg) == before
    assert not (root / "pwned").exists()
    # still serving
    flat_logits(tiny_model, reg, [torch.arange(4)], ["good"])
    # a failed replace keeps the old version
    with pytest.raises(BankAdminError):
        reg.load_sync("good", path)
    assert _snapshot(reg) == before


def test_load_dir_loads_every_format_and_allows_the_root(tmp_path, tiny_model_dir, tiny_config):
    root = tmp_path / "banks"
    for kind in ("lora", "mixlora", "dynmole", "mola"):
        _write_good(kind, root / f"{kind}-bank", tiny_model_dir)
    (root / "broken").mkdir()
    reg = BankRegistry(tiny_config)
    loaded, errors = reg.load_dir(root)
    assert loaded == ["dynmole-bank", "lora-bank", "mixlora-bank", "mola-bank"]
    assert len(errors) == 1 and "broken" in errors[0]
    assert {b["name"]: b["kind"] for b in reg.list()} == {
        "dynmole-bank": "dynmole", "lora-bank": "lora", "mixlora-bank": "mixlora", "mola-bank": "mola"}
    info = asyncio.run(reg.load("again", root / "lora-bank"))  # the root is allowed for later loads
    assert info["kind"] == "lora" and info["version"] == 5
    with pytest.raises(BankAdminError, match="invalid"):
        reg.load_sync("../x", root / "lora-bank")


def test_the_ray_catalog_loads_a_banks_folder_as_the_registry_does(tmp_path, tiny_model_dir, tiny_config):
    from server.distributed.catalog import BankCatalog

    root = tmp_path / "banks"
    for kind in ("lora", "dynmole"):
        _write_good(kind, root / f"{kind}-bank", tiny_model_dir)
    (root / "broken").mkdir()
    catalog = BankCatalog(fingerprint_of(tiny_model_dir))
    loaded, errors = catalog.load_dir(root)
    assert loaded == ["dynmole-bank", "lora-bank"]
    assert len(errors) == 1 and "broken" in errors[0]
    assert catalog.allowed_roots == [root]
    assert catalog.locations("dynmole-bank+lora-bank") == {
        "dynmole-bank": (str(root / "dynmole-bank"), 1), "lora-bank": (str(root / "lora-bank"), 2)}
    with pytest.raises(BankAdminError, match="not a folder"):
        catalog.load_dir(tmp_path / "missing")
