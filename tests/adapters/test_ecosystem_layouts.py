"""The builders' checkpoints load in the ecosystem's own libraries (so their key layouts are the
real ones), and those libraries see the same tensors our converters put in the bank."""

from __future__ import annotations

import pytest
import torch
from tests.adapters.bank_builders import TINY, write_mixlora, write_peft_lora

from adapters import load_bank


def _tiny_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_peft_loads_the_peft_layout(tmp_path):
    peft = pytest.importorskip("peft")
    write_peft_lora(tmp_path / "a", targets=("k_proj", "down_proj"), r=4, alpha=8)
    model = peft.PeftModel.from_pretrained(_tiny_hf_model(), str(tmp_path / "a"))
    bank = load_bank(tmp_path / "a", base=TINY)
    k = model.base_model.model.model.layers[1].self_attn.k_proj
    torch.testing.assert_close(k.lora_A["default"].weight, bank.layers[1].linears["k_proj"].lora_a[0])
    torch.testing.assert_close(k.lora_B["default"].weight, bank.layers[1].linears["k_proj"].lora_b[0])
    assert k.scaling["default"] == bank.layers[1].linears["k_proj"].scaling


def test_mixlora_package_loads_the_mixlora_layout(tmp_path):
    mixlora = pytest.importorskip("mixlora")
    write_mixlora(tmp_path / "m", num_experts=4, top_k=2, act_fn="silu")
    config, weights = mixlora.load_adapter_weights(str(tmp_path / "m"), device="cpu")
    model = _tiny_hf_model()
    mixlora.inject_adapter_in_model(model, config, weights)
    bank = load_bank(tmp_path / "m", base=TINY)
    moe = model.model.layers[1].mlp.mixlora_moes["default"]
    torch.testing.assert_close(moe.gate_, bank.layers[1].block_router)
    up2 = moe.experts_["experts.2.up_proj"]
    torch.testing.assert_close(up2.lora_B.weight, bank.layers[1].linears["up_proj"].lora_b[2])
    assert up2.scaling_ == bank.layers[1].linears["up_proj"].scaling
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_A.weight, bank.layers[0].linears["q_proj"].lora_a[0])
