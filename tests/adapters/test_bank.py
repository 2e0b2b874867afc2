"""Our format: save -> load gives back the same bank, and the in-memory API's accessors."""

from __future__ import annotations

import json

import pytest
import torch
from tests.adapters.bank_builders import TINY, random_bank

from adapters import BankError, BaseFingerprint, ExpertBank, load_bank, validate_bank


def _assert_same(a: ExpertBank, b: ExpertBank) -> None:
    assert (a.name, a.version, a.kind, a.base, a.rank, a.alpha, a.use_rslora, a.routing, a.targets, a.act_fn) == (
        b.name, b.version, b.kind, b.base, b.rank, b.alpha, b.use_rslora, b.routing, b.targets, b.act_fn
    )
    ta, tb = a.named_tensors(), b.named_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert tb[k].dtype == torch.float32
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    for la, lb in zip(a.layers, b.layers):
        for t in la.linears:
            assert la.linears[t].scaling == lb.linears[t].scaling


@pytest.mark.parametrize("kind", ["lora", "mixlora", "dynmole", "mola"])
def test_round_trip(tmp_path, kind):
    bank = random_bank(kind)
    bank.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bank.json", "weights.safetensors"]
    _assert_same(bank, ExpertBank.load(tmp_path / "b"))
    _assert_same(bank, load_bank(tmp_path / "b", base=TINY))


def test_per_layer_expert_counts_and_sizes(tmp_path):
    bank = random_bank("mola", experts_per_layer=(2, 5))
    assert [layer.num_experts() for layer in bank.layers] == [2, 5]
    assert bank.num_experts() == 5
    assert bank.nbytes() == sum(t.numel() * 4 for t in bank.named_tensors().values())
    bank.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bank.json").read_text())
    assert meta["layers"][1]["experts"] == {"q_proj": 5, "o_proj": 5, "down_proj": 5}
    assert ExpertBank.load(tmp_path / "b").layers[1].linears["o_proj"].lora_b.shape == (5, 64, 4)


def test_tensor_names_follow_hf_modules():
    names = random_bank("mixlora").named_tensors()
    assert "layers.0.self_attn.q_proj.lora_a" in names
    assert "layers.1.mlp.down_proj.lora_b" in names
    assert "layers.1.mlp.block_router" in names


def test_untouched_layers_and_rslora(tmp_path):
    bank = random_bank("lora")
    bank.layers[1] = type(bank.layers[1])()
    bank.use_rslora = True
    for layer in bank.layers:
        for experts in layer.linears.values():
            experts.scaling = bank.alpha / 2.0  # sqrt(r) with r = 4
    bank.save(tmp_path / "b")
    loaded = load_bank(tmp_path / "b")
    assert loaded.layers[1].is_empty() and loaded.scaling == 4.0


def test_name_override_and_fingerprint_helpers(tmp_path):
    random_bank("lora").save(tmp_path / "b")
    assert load_bank(tmp_path / "b", name="other").name == "other"
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 1e4}
    assert BaseFingerprint.from_hf_config(cfg) == TINY
    assert TINY.mismatches(BaseFingerprint.from_hf_config({**cfg, "hidden_size": 128})) == [
        "hidden_size 64 != 128", "head_dim 16 != 32"
    ]


def test_save_refuses_an_invalid_bank(tmp_path):
    bank = random_bank("dynmole")
    bank.layers[0].linears["gate_proj"].router = None
    with pytest.raises(BankError, match="has no router"):
        bank.save(tmp_path / "b")
    assert not (tmp_path / "b" / "bank.json").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: setattr(b, "kind", "mixlora"), "routes with topk or topp"),
        (lambda b: b.layers[0].linears["k_proj"].__setattr__("scaling", 3.0), "scaling 3.0"),
        (lambda b: setattr(b, "targets", ("gate_proj", "k_proj", "up_proj", "down_proj")), "order"),
        (lambda b: setattr(b, "name", "../evil"), "bank name"),
        (lambda b: b.layers.pop(), "has 1 layers"),
        (lambda b: b.extra.update(x=torch.zeros(2)), "no extra tensors"),
        (lambda b: setattr(b.layers[0].linears["up_proj"], "lora_a", torch.zeros(3, 4, 64, dtype=torch.float16)), "float16"),
    ],
)
def test_validation_catches(mutate, message):
    bank = random_bank("dynmole")
    mutate(bank)
    with pytest.raises(BankError, match=message):
        validate_bank(bank)
