"""Vision towers of each supported family equal transformers' hidden_states[select_layer], with the
CLS token kept or dropped as ``select_feature`` says."""

from __future__ import annotations

import json

import pytest
import torch

from server.model.errors import ModelLoadError
from server.model.vision import load_vision_tower

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14)


def _tower(folder, family):
    import transformers

    cls, cfg_cls, size = {"clip": ("CLIPVisionModel", "CLIPVisionConfig", 42),
                          "siglip": ("SiglipVisionModel", "SiglipVisionConfig", 42),
                          "dinov2": ("Dinov2Model", "Dinov2Config", 518)}[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(image_size=size, **SMALL)).eval()
    model.save_pretrained(folder)
    side = 28 if family == "dinov2" else 42  # Dinov2 interpolates its positions to the processor's size
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": side, "width": side}}))
    return model, side


@pytest.mark.parametrize("family, feature, layer", [("clip", "cls_patch", -2), ("clip", "patch", -1),
                                                    ("siglip", "patch", -2), ("dinov2", "cls_patch", 1)])
def test_features_equal_transformers_hidden_states(tmp_path, family, feature, layer):
    model, side = _tower(tmp_path / family, family)
    tower = load_vision_tower(tmp_path / family, select_layer=layer, select_feature=feature)
    pv = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = model(pixel_values=pv, output_hidden_states=True).hidden_states[layer]
    if feature == "patch" and family != "siglip":
        ref = ref[:, 1:]
    got = tower.features(pv)
    assert got.shape == ref.shape and got.shape[1] == tower.num_tokens
    assert torch.allclose(got, ref, atol=1e-5)


def test_siglip_has_no_cls_to_keep(tmp_path):
    _tower(tmp_path / "s", "siglip")
    with pytest.raises(ModelLoadError, match="needs a CLS token"):
        load_vision_tower(tmp_path / "s", select_feature="cls_patch")
