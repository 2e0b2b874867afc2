"""Each converter on a checkpoint written in that ecosystem's exact key layout."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tests.adapters.bank_builders import TINY, write_mixlora, write_peft_lora, write_plugin_moe

from adapters import BankError, ExpertBank, RoutingConfig, load_bank
from adapters.convert import cli


def _rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peft_lora(tmp_path, fmt):
    src = tmp_path / "my adapter"
    written = write_peft_lora(src, r=4, alpha=8, targets=("q_proj", "k_proj", "down_proj"), fmt=fmt, dtype=torch.bfloat16)
    bank = load_bank(src, base=TINY)
    assert (bank.kind, bank.name, bank.rank, bank.alpha, bank.routing) == ("lora", "my-adapter", 4, 8.0, RoutingConfig("none"))
    assert bank.targets == ("q_proj", "k_proj", "down_proj") and bank.num_experts() == 1
    k = bank.layers[1].linears["k_proj"]
    assert k.lora_a.shape == (1, 4, 64) and k.lora_b.shape == (1, 32, 4) and k.router is None
    assert k.lora_a.dtype == torch.float32 and k.scaling == 2.0
    torch.testing.assert_close(k.lora_a[0], written["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].float())
    torch.testing.assert_close(
        bank.layers[0].linears["down_proj"].lora_b[0], written["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].float()
    )


def test_peft_lora_rslora_subset_of_layers_and_flags(tmp_path):
    # fan_in_fan_out is ignored for nn.Linear targets (PEFT itself turns it off); a regex
    # target_modules is allowed: the weights say what is adapted.
    write_peft_lora(tmp_path / "a", r=4, alpha=8, use_rslora=True, layers=[1], targets=("v_proj",),
                    fan_in_fan_out=True, target_modules=".*v_proj")
    bank = load_bank(tmp_path / "a", base=TINY)
    assert bank.layers[0].is_empty() and bank.layers[1].linears["v_proj"].scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern is set"),
        ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern is set"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias 'all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head'"),
        ({"peft_type": "IA3"}, "not a LoRA"),
        ({"r": 8}, r"lora_A.weight has shape \(4, 64\), expected \(8, 64\)"),
    ],
)
def test_peft_lora_refusals(tmp_path, changes, message):
    write_peft_lora(tmp_path / "a", targets=("q_proj",))
    _rewrite_config(tmp_path / "a", **changes)
    with pytest.raises(BankError, match=message) as info:
        load_bank(tmp_path / "a", base=TINY)
    assert str(info.value).startswith("bank 'a': adapter_")


def test_peft_lora_stray_and_missing_tensors(tmp_path):
    tensors = write_peft_lora(tmp_path / "a", targets=("q_proj",), fmt="bin")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(256, 64)
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(BankError, match="adapter_model.bin: unexpected tensor base_model.model.lm_head.weight"):
        load_bank(tmp_path / "a", base=TINY)
    del tensors["base_model.model.lm_head.weight"]
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(BankError, match="missing tensor base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"):
        load_bank(tmp_path / "a", base=TINY)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_mixlora(tmp_path, fmt):
    written = write_mixlora(tmp_path / "m", r=4, alpha=16, num_experts=4, top_k=2, fmt=fmt, act_fn="silu")
    bank = load_bank(tmp_path / "m", base=TINY, name="mix")
    assert (bank.kind, bank.act_fn, bank.routing) == ("mixlora", "silu", RoutingConfig("topk", top_k=2))
    assert bank.targets == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    layer = bank.layers[1]
    torch.testing.assert_close(layer.block_router, written["mixlora.layers.1.mlp.moe_gate.weight"])
    q = layer.linears["q_proj"]
    assert q.lora_a.shape == (1, 4, 64) and q.router is None and q.scaling == 4.0
    torch.testing.assert_close(q.lora_b[0], written["mixlora.layers.1.self_attn.q_proj.lora_B.weight"])
    down = layer.linears["down_proj"]
    assert down.lora_a.shape == (4, 4, 128) and down.lora_b.shape == (4, 64, 4) and down.router is None
    for e in range(4):
        torch.testing.assert_close(down.lora_a[e], written[f"mixlora.layers.1.mlp.down_proj.experts.{e}.lora_A.weight"])
        torch.testing.assert_close(down.lora_b[e], written[f"mixlora.layers.1.mlp.down_proj.experts.{e}.lora_B.weight"])


def test_mixlora_defaults_and_dynamic(tmp_path):
    write_mixlora(tmp_path / "m", act_fn=None, top_k=2)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    del cfg["top_k"]
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(cfg))
    bank = load_bank(tmp_path / "m", base=TINY)
    assert bank.act_fn is None and bank.routing.top_k == 2  # the released defaults

    write_mixlora(tmp_path / "d", routing_strategy="mixlora-dynamic", top_p=0.6, temperature=0.5)
    bank = load_bank(tmp_path / "d", base=TINY)
    assert bank.routing == RoutingConfig("topp", top_p=0.6, temperature=0.5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"routing_strategy": "mixlora-switch"}, "mixlora-switch' is not supported"),
        ({"peft_type": "LORAMOE", "routing_strategy": "loramoe"}, "LoRAMoE"),
        ({"expert_lora": {"r": 8, "lora_alpha": 16}}, "expert_lora overrides r"),
        ({"target_modules": ["q_proj", "fc1"]}, "'fc1'"),
        ({"num_experts": 10**9}, "number of experts must be an integer"),
        ({"top_k": 5}, "top_k 5 exceeds the 4 experts"),
    ],
)
def test_mixlora_refusals(tmp_path, changes, message):
    write_mixlora(tmp_path / "m", num_experts=4)
    _rewrite_config(tmp_path / "m", **changes)
    with pytest.raises(BankError, match=message):
        load_bank(tmp_path / "m", base=TINY)


def test_mixlora_expert_lora_that_agrees_is_accepted(tmp_path):
    write_mixlora(tmp_path / "m", r=4, alpha=8, expert_lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1})
    assert load_bank(tmp_path / "m", base=TINY).rank == 4


def test_dynmole(tmp_path):
    written = write_plugin_moe(
        tmp_path / "d", kind="dynmole", num_experts=3, targets=("q_proj", "down_proj"), entropy_threshold=0.5,
        entropy_index=1.5, entropy_type="renyi", entropy_eps=1e-4, keep_top_k=1, top_p=0.6,
    )
    bank = load_bank(tmp_path / "d", base=TINY)
    assert bank.kind == "dynmole"
    # The released router computes Tsallis entropy whatever entropy_type says.
    assert bank.routing == RoutingConfig(
        "dynmole", top_p=0.6, keep_top_k=1, entropy_threshold=0.5, entropy_index=1.5, entropy_eps=1e-4, entropy_type="tsallis"
    )
    down = bank.layers[0].linears["down_proj"]
    assert down.router.shape == (3, 128)  # the down_proj router sees the intermediate activation
    torch.testing.assert_close(down.router, written["dynmole.layers.0.mlp.down_proj.moe_gate.weight"])
    torch.testing.assert_close(down.lora_b[2], written["dynmole.layers.0.mlp.down_proj.experts.2.lora_B.weight"])
    q = bank.layers[1].linears["q_proj"]
    torch.testing.assert_close(q.lora_a[1], written["dynmole.layers.1.self_attn.q_proj.experts.1.lora_A.weight"])
    assert all(layer.block_router is None for layer in bank.layers)


def test_dynmole_defaults_and_mola(tmp_path):
    write_plugin_moe(tmp_path / "d", kind="dynmole")
    assert load_bank(tmp_path / "d", base=TINY).routing == RoutingConfig("dynmole", top_p=0.75, keep_top_k=2,
                                                                         entropy_threshold=0.9, entropy_index=1.1)
    written = write_plugin_moe(tmp_path / "m", kind="mola", num_experts=4, top_k=3, fmt="safetensors")
    bank = load_bank(tmp_path / "m", base=TINY)
    assert (bank.kind, bank.routing) == ("mola", RoutingConfig("topk", top_k=3))
    torch.testing.assert_close(bank.layers[1].linears["up_proj"].router, written["mola.layers.1.mlp.up_proj.moe_gate.weight"])


def test_moe_peft_missing_expert_is_refused(tmp_path):
    tensors = write_plugin_moe(tmp_path / "d", kind="dynmole", num_experts=3)
    del tensors["dynmole.layers.1.mlp.up_proj.experts.2.lora_A.weight"]
    torch.save(tensors, tmp_path / "d" / "adapter_model.bin")
    with pytest.raises(BankError, match="adapter_model.bin: missing tensor dynmole.layers.1.mlp.up_proj.experts.2.lora_A.weight"):
        load_bank(tmp_path / "d", base=TINY)


def test_converting_needs_the_base(tmp_path):
    write_plugin_moe(tmp_path / "d")
    with pytest.raises(BankError, match="needs the base model's fingerprint"):
        load_bank(tmp_path / "d")


def _model_folder(tmp_path, **changes):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    cfg = {**TINY.to_dict(), "architectures": ["LlamaForCausalLM"], **changes}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_cli_without_model_and_no_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOLESERVE_CACHE", str(tmp_path / "empty-cache"))
    write_plugin_moe(tmp_path / "src")
    assert cli([str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("pass --model" in err or "needs the base model's fingerprint" in err), err


def test_cli_converts(tmp_path, capsys):
    write_mixlora(tmp_path / "src")
    model = _model_folder(tmp_path)
    assert cli([str(tmp_path / "src"), str(tmp_path / "dst"), "--name", "mix", "--model", str(model)]) == 0
    assert "wrote bank 'mix'" in capsys.readouterr().out
    bank = ExpertBank.load(tmp_path / "dst", base=TINY)
    assert bank.name == "mix" and bank.kind == "mixlora"
    # our own format re-saves under a new name
    assert cli([str(tmp_path / "dst"), str(tmp_path / "dst2"), "--name", "mix2", "--model", str(model)]) == 0
    assert load_bank(tmp_path / "dst2").name == "mix2"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required"),
        (["{src}", "{dst}", "--bogus"], "unrecognized arguments"),
        (["{src}", "{dst}", "--model", "{tmp}/nowhere"], "cannot read config.json"),
        (["{tmp}/nothing", "{dst}", "--model", "{model}"], "does not exist"),
        (["{src}", "{src}", "--model", "{model}"], "exists and is not an empty folder"),
        (["{src}", "{dst}", "--model", "{model_big}"], "different|has shape"),
        (["{src}", "{dst}", "--name", "a b", "--model", "{model}"], "bank name 'a b' is not valid"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, message):
    write_plugin_moe(tmp_path / "src")
    model = _model_folder(tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**TINY.to_dict(), "hidden_size": 128}))
    fill = {"src": tmp_path / "src", "dst": tmp_path / "dst", "tmp": tmp_path, "model": model, "model_big": big}
    assert cli([a.format(**fill) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("moleserve convert: ")
    assert re.search(message, err), err
    assert not (tmp_path / "dst").exists()
