"""oneDNN-packed base weights (CPU fp32 inference) give the same logits as the plain weights."""

from __future__ import annotations

import pytest
import torch

from server.model import SequenceKVCache, StepContext, load_model, step_context
from tests.conftest import make_tiny_model


def _logits(model, ids):
    cache = SequenceKVCache(model.config)
    step = cache.step([0], [len(ids)])
    with torch.inference_mode(), step_context(StepContext(positions=step.positions(), attention=step)):
        return model(ids)


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}])
def test_packed_equals_plain(tmp_path, default_model_dir, overrides):
    model = load_model(make_tiny_model(tmp_path / "m", default_model_dir, **overrides))
    ids = torch.randint(0, model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(0))
    plain = _logits(model, ids)
    if not model.pack_weights():
        pytest.skip("oneDNN packing unavailable in this torch build")
    assert model.layers[0].mlp.gate_up_proj.packed is not None and model.lm_head_packed is not None
    torch.testing.assert_close(_logits(model, ids), plain, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, model.config.hidden_size, requires_grad=True)  # autograd never takes the packed path
    lin = model.layers[0].self_attn.qkv_proj
    assert lin.base(x).grad_fn is not None
    model.unpack_weights()
    assert lin.packed is None and model.lm_head_packed is None
    torch.testing.assert_close(_logits(model, ids), plain, atol=0, rtol=0)


def test_packing_can_be_switched_off(tmp_path, default_model_dir, monkeypatch):
    monkeypatch.setenv("MOLESERVE_PACKED_WEIGHTS", "0")
    model = load_model(make_tiny_model(tmp_path / "m", default_model_dir))
    assert not model.pack_weights()
    assert model.layers[0].mlp.down_proj.packed is None
