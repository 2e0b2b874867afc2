"""Hostile and broken input: each refused with a one-line BankError naming the file and reason."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from tests.adapters.bank_builders import TINY, random_bank, write_mixlora, write_peft_lora
from safetensors.torch import save_file

import adapters.storage
from adapters import BankError, BaseFingerprint, ExpertBank, load_bank, resolve_bank_path
from adapters.convert.checkpoint import Checkpoint


def _refused(path, match, **kwargs) -> BankError:
    with pytest.raises(BankError, match=match) as info:
        load_bank(path, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "bank"
    random_bank("dynmole", name="x").save(folder)
    return folder


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "bank.json").read_text())
    meta.update(changes)
    (folder / "bank.json").write_text(json.dumps(meta))


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "weights.safetensors"))


# -- missing and truncated files ------------------------------------------------------------------

def test_missing_files(saved, tmp_path):
    (saved / "weights.safetensors").unlink()
    _refused(saved, r"^bank 'x': weights.safetensors: cannot be read")
    (saved / "bank.json").unlink()
    _refused(saved, "holds neither bank.json nor adapter_config.json")
    with pytest.raises(BankError, match="bank.json: missing"):
        ExpertBank.load(saved)
    _refused(tmp_path / "nowhere", "does not exist")
    write_peft_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").unlink()
    _refused(tmp_path / "p", "missing: the folder has neither adapter_model.safetensors nor adapter_model.bin", base=TINY)


@pytest.mark.parametrize("keep, match", [(4, "too short"), (100, "does not fit the file"), (-40, "truncated: tensor")])
def test_truncated_safetensors(saved, keep, match):
    path = saved / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    _refused(saved, f"weights.safetensors: .*{match}")


def test_hostile_safetensors_header(saved):
    path = saved / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    _refused(saved, "header length 1099511627776 does not fit")
    header = json.dumps({"layers.0.mlp.gate_proj.lora_a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _refused(saved, "dtype 'I64'")


def test_truncated_bin(tmp_path):
    write_mixlora(tmp_path / "m", fmt="bin")
    path = tmp_path / "m" / "adapter_model.bin"
    path.write_bytes(path.read_bytes()[:-300])
    _refused(tmp_path / "m", r"^bank 'm': adapter_model.bin: cannot be read as a weights-only torch checkpoint", base=TINY)


# -- wrong content --------------------------------------------------------------------------------

def test_wrong_shape(saved):
    _rewrite_weights(saved, lambda t: t.update({"layers.0.mlp.gate_proj.lora_a": torch.zeros(3, 4, 63)}))
    _refused(saved, r"^bank 'x': weights.safetensors: tensor layers.0.mlp.gate_proj.lora_a has shape \(3, 4, 63\), expected \(3, 4, 64\)$")


def test_unexpected_and_missing_tensor(saved):
    _rewrite_weights(saved, lambda t: t.update({"layers.0.mlp.gate_proj.lora_c": torch.zeros(1)}))
    _refused(saved, "weights.safetensors: unexpected tensor layers.0.mlp.gate_proj.lora_c")
    _rewrite_weights(saved, lambda t: [t.pop("layers.0.mlp.gate_proj.lora_c"), t.pop("layers.1.mlp.up_proj.router")])
    _refused(saved, "weights.safetensors: missing tensor layers.1.mlp.up_proj.router")


def test_bank_for_another_base_model(saved):
    other = BaseFingerprint(**{**TINY.to_dict(), "num_hidden_layers": 4, "vocab_size": 512})
    _refused(saved, r"bank.json: was made for a different base model: num_hidden_layers 2 != 4; vocab_size 256 != 512", base=other)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(saved, tmp_path, value):
    def poison(t):
        t["layers.1.mlp.down_proj.lora_b"][0, 3, 1] = value

    _rewrite_weights(saved, poison)
    _refused(saved, r"weights.safetensors: tensor layers.1.mlp.down_proj.lora_b has 1 NaN or infinite values")
    bank = random_bank("lora")
    bank.layers[0].linears["q_proj"].lora_a[0, 0, 0] = value
    with pytest.raises(BankError, match="NaN or infinite"):
        bank.save(tmp_path / "never")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"kind": "weird"}, "unknown kind 'weird'"),
        ({"kind": "factor"}, "kind 'factor' routes with topk, not 'dynmole'"),
        ({"targets": ["k_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}, "unknown target 'lm_head'"),
        ({"rank": 8}, r"tensor layers.0.self_attn.k_proj.lora_a has shape \(3, 4, 64\), expected \(3, 8, 64\)"),
        ({"rank": 10**6}, r"rank must be an integer in \[1, 1024\]"),
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"surprise": 1}, "unknown fields: surprise"),
        ({"routing": {"strategy": "dynmole", "top_p": 1.5}}, r"routing.top_p must be a finite number in \(0.0, 1.0\]"),
        ({"alpha": float("nan")}, "alpha must be a finite positive number"),
    ],
)
def test_bad_metadata(saved, changes, match):
    _edit_meta(saved, **changes)
    err = _refused(saved, match)
    assert str(err).startswith(("bank 'x': bank.json: ", "bank 'x': weights.safetensors: ")), err


def test_rank_mismatch_in_memory():
    bank = random_bank("lora")
    bank.layers[0].linears["q_proj"].lora_a = torch.zeros(1, 8, 64)
    with pytest.raises(BankError, match="has rank 8, the bank's rank is 4"):
        from adapters import validate_bank

        validate_bank(bank)


def test_not_json(saved):
    (saved / "bank.json").write_text("{nope")
    _refused(saved, "bank.json: not valid JSON")


# -- absurd sizes are refused before anything is allocated ----------------------------------------

def test_absurd_sizes_refused_before_reading(saved, tmp_path, monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(adapters.storage, "read_safetensors", no_read)
    meta = json.loads((saved / "bank.json").read_text())
    meta["layers"][0]["experts"]["gate_proj"] = 10**9
    (saved / "bank.json").write_text(json.dumps(meta))
    _refused(saved, r"number of experts must be an integer in \[1, 256\], got 1000000000")

    meta["layers"][0]["experts"]["gate_proj"] = 256
    meta["base"]["intermediate_size"] = 10**9
    (saved / "bank.json").write_text(json.dumps(meta))
    _refused(saved, "declares .* bytes of tensors, more than the .* byte limit")

    monkeypatch.setattr(Checkpoint, "load_weights", no_read)
    write_mixlora(tmp_path / "m", num_experts=2)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps({**cfg, "num_experts": 10**12}))
    _refused(tmp_path / "m", "adapter_config.json: num_experts: number of experts", base=TINY)
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 10**9}))
    _refused(tmp_path / "m", "adapter_config.json: rank must be", base=TINY)


# -- pickles that would run code ------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_code_executing_pickle_is_refused(tmp_path):
    folder = tmp_path / "evil"
    write_mixlora(folder, fmt="bin")
    marker = tmp_path / "marker"
    tensors = torch.load(folder / "adapter_model.bin", weights_only=True)
    tensors["mixlora.layers.0.mlp.moe_gate.weight"] = _Evil(marker)
    torch.save(tensors, folder / "adapter_model.bin")

    err = _refused(folder, r"^bank 'evil': adapter_model.bin: cannot be read as a weights-only torch checkpoint \(UnpicklingError", base=TINY)
    assert not marker.exists()
    assert len(str(err)) < 400

    # The payload is live: an unsafe load of the same file runs it.
    torch.load(folder / "adapter_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


# -- path safety ----------------------------------------------------------------------------------

def test_resolve_bank_path(tmp_path):
    root, outside = tmp_path / "banks", tmp_path / "outside"
    random_bank("lora").save(root / "good")
    random_bank("lora").save(outside / "secret")
    assert resolve_bank_path(root / "good", [root]) == (root / "good").resolve()
    assert resolve_bank_path(str(root / "good" / ".." / "good"), [str(root)]) == (root / "good").resolve()

    with pytest.raises(BankError, match="is outside the allowed folders"):
        resolve_bank_path(root / ".." / "outside" / "secret", [root])
    os.symlink(outside / "secret", root / "link")
    with pytest.raises(BankError, match="is outside the allowed folders"):
        resolve_bank_path(root / "link", [root])
    os.symlink(root / "good", root / "inner-link")
    assert resolve_bank_path(root / "inner-link", [root]) == (root / "good").resolve()

    (root / "sneaky").mkdir()
    (root / "sneaky" / "bank.json").write_text((root / "good" / "bank.json").read_text())
    os.symlink(outside / "secret" / "weights.safetensors", root / "sneaky" / "weights.safetensors")
    with pytest.raises(BankError, match="weights.safetensors points outside the allowed folders"):
        resolve_bank_path(root / "sneaky", [root])
    with pytest.raises(BankError, match="does not exist"):
        resolve_bank_path(root / "missing", [root])
    with pytest.raises(BankError, match="no folders are allowed"):
        resolve_bank_path(root / "good", [])


# -- issue #19: files that hang, crash or overflow the loader ------------------------------------

def _refused_within(seconds: float, path, match, **kwargs) -> BankError:
    """``_refused``, on a thread, failing (not hanging the suite) if the load does not return in time."""
    import threading

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("err", _try(path, kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_bank({path}) still running after {seconds}s"
    err = box["err"]
    assert isinstance(err, BankError) and "\n" not in str(err), err
    assert __import__("re").search(match, str(err)), str(err)
    return err


def _try(path, kwargs):
    try:
        load_bank(path, **kwargs)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


@pytest.mark.parametrize("victim", ["weights.safetensors", "bank.json"])
def test_fifo_in_a_bank_folder_is_refused_not_opened(saved, victim):
    (saved / victim).unlink()
    os.mkfifo(saved / victim)
    _refused_within(10, saved, f"{victim}: is not a regular file")


def test_fifo_in_a_checkpoint_folder(tmp_path):
    write_peft_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "p" / "adapter_model.safetensors")
    _refused_within(10, tmp_path / "p", "adapter_model.safetensors: is not a regular file", base=TINY)


@pytest.mark.parametrize("value", [["lora"], {"kind": "lora"}, 7])
def test_kind_of_the_wrong_type(saved, value):
    _edit_meta(saved, kind=value)
    _refused(saved, r"^bank 'x': bank.json: kind must be a string")


@pytest.mark.parametrize("field", ["peft_type", "routing_strategy"])
def test_checkpoint_names_of_the_wrong_type(tmp_path, field):
    write_peft_lora(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg[field] = ["LORA"] if field == "peft_type" else {"a": 1}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(tmp_path / "p", f"adapter_config.json: {field} must be a string", base=TINY)


def test_deeply_nested_json(saved, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (saved / "bank.json").write_text(deep)
    _refused(saved, "bank.json: not valid JSON \\(nested too deeply\\)")
    write_peft_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").write_text('{"r": ' + deep + "}")
    _refused(tmp_path / "p", "adapter_config.json: not valid JSON \\(nested too deeply\\)", base=TINY)


@pytest.mark.parametrize("shape", [[10**30], [2**40, 2**40], [1] * 9, [-1]])
def test_huge_integers_in_extra(saved, shape):
    _edit_meta(saved, kind="factor", extra={"w": shape})
    _refused(saved, r"bank.json: extra.w: (invalid shape|shape .* byte limit)")


def test_a_refusal_names_the_requested_bank(saved):
    _edit_meta(saved, kind=["dynmole"])
    _refused(saved, r"^bank 'asked-for': bank.json: kind must be a string", name="asked-for")
    _edit_meta(saved, kind="dynmole")
    (saved / "weights.safetensors").write_bytes(b"\0" * 4)
    _refused(saved, r"^bank 'asked-for': weights.safetensors", name="asked-for")


def test_declared_size_checked_against_the_budget_before_reading(saved, monkeypatch):
    from adapters.errors import BankBudgetExceeded

    monkeypatch.setattr(adapters.storage, "read_safetensors", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(BankBudgetExceeded, match=r"bank.json: declares \d+ bytes .* budget has 1000 bytes left"):
        load_bank(saved, max_bytes=1000)
