"""Loading Parrot checkpoints and vision towers: what wins, and what is refused (one line, exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.cli import main
from server.model.errors import ModelLoadError
from server.model.parrot import load_model_with_vision

from .builders import TOKENS_PER_IMAGE


def _generate(capsys, folder, *extra):
    code = main(["generate", "--model", str(folder), *extra, "hi", "--max-tokens", "2"])
    return code, capsys.readouterr()


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def test_released_layout_loads_with_the_checkpoints_tower_weights(parrot_dir, parrot_model):
    llm, vision = parrot_model
    assert llm.config.model_type == "qwen2" and llm.config.qkv_bias  # the LLM: a plain Qwen2 decoder
    assert vision.tokens_per_image == TOKENS_PER_IMAGE and vision.adapter is not None
    assert vision.adapter.config.num_experts == 3 and vision.adapter.config.moe_weight == 0.1
    state = load_file(str(parrot_dir / "model.safetensors"))
    got = vision.tower.model.state_dict()
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[key], state["model.vision_tower.vision_tower.vision_model." + key])
    folder_weights = load_file(str(vision.tower.folder / "model.safetensors"))
    assert not torch.equal(got[key], folder_weights[key])  # the checkpoint's copy won
    # layers after the selected one (-2 of 3) are not kept: they never reach the features
    assert len(vision.tower.model.encoder.layers) == 2
    proj = vision.adapter.mm_projector[0].weight
    assert torch.equal(proj, state["model.mm_projector.0.weight"])


def test_cli_generate_serves_a_parrot_checkpoint(capsys, parrot_dir):
    code, out = _generate(capsys, parrot_dir)
    assert code == 0, out.err


def test_hub_id_without_a_local_folder_is_refused_naming_the_flag(capsys, tmp_path, parrot_dir, tower_dir):
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    _edit_config(folder, mm_vision_tower="openai/clip-vit-large-patch14-336")
    code, out = _generate(capsys, folder)
    err = out.err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "openai/clip-vit-large-patch14-336" in err and "--vision-tower" in err
    code, out = _generate(capsys, folder, "--vision-tower", str(tower_dir))  # the flag fixes it
    assert code == 0, out.err


def test_vision_tower_flag_wins_over_mm_vision_tower(tmp_path, parrot_dir, tower_dir):
    other = shutil.copytree(tower_dir, tmp_path / "other-tower")
    pre = json.loads((other / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 28, "width": 28}
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    _, vision = load_model_with_vision(parrot_dir, vision_tower=other)
    assert vision.tower.folder == other and vision.tokens_per_image == (28 // 14) ** 2 + 1


@pytest.mark.parametrize("damage, expect", [
    (lambda s: s.pop("model.moe_model.experts.1.up_proj.weight"), "missing tensor model.moe_model.experts.1.up_proj.weight"),
    (lambda s: s.update({"model.mm_projector.2.weight": torch.zeros(3, 3)}), "model.mm_projector.2.weight has shape (3, 3)"),
    (lambda s: s.update({"model.moe_model.gate.weight": torch.full((3, 64), float("nan"))}), "holds NaN"),
    (lambda s: s.pop("model.layers.1.self_attn.q_proj.bias"), "missing tensor model.layers.1.self_attn.q_proj.bias"),
], ids=["missing-expert", "misshaped-projector", "nan-router", "missing-llm-bias"])
def test_bad_checkpoint_tensors_are_refused(capsys, tmp_path, parrot_dir, damage, expect):
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    _edit_weights(folder, damage)
    code, out = _generate(capsys, folder)
    err = out.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_tower_tensors_missing_from_both_folder_and_checkpoint_are_refused(tmp_path, parrot_dir, tower_dir):
    tower = shutil.copytree(tower_dir, tmp_path / "t")
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    key = "encoder.layers.1.mlp.fc1.weight"
    _edit_weights(tower, lambda s: s.pop(key))
    load_model_with_vision(folder, vision_tower=tower)  # the checkpoint still has its copy
    _edit_weights(folder, lambda s: s.pop("model.vision_tower.vision_tower.vision_model." + key))
    with pytest.raises(ModelLoadError, match=f"missing vision tower tensor {key}"):
        load_model_with_vision(folder, vision_tower=tower)


def test_bad_vision_config_is_refused(capsys, tmp_path, parrot_dir):
    folder = shutil.copytree(parrot_dir, tmp_path / "p")
    _edit_config(folder, mm_hidden_size=48)
    code, out = _generate(capsys, folder)
    assert code == 2 and "mm_hidden_size" in out.err
    _edit_config(folder, mm_hidden_size=32, mm_vision_select_feature="everything")
    code, out = _generate(capsys, folder)
    assert code == 2 and "mm_vision_select_feature" in out.err and len(out.err.strip().splitlines()) == 1


def test_not_a_tower_folder(capsys, tiny_model_dir):
    code, out = _generate(capsys, tiny_model_dir, "--vision-tower", str(tiny_model_dir))
    assert code == 2 and "not a supported vision tower" in out.err


def test_llama_with_a_vision_tower_has_no_projector(tiny_model_dir, tower_dir):
    llm, vision = load_model_with_vision(tiny_model_dir, vision_tower=tower_dir)
    assert vision.adapter is None and vision.tokens_per_image == TOKENS_PER_IMAGE
    assert vision.config.mm_hidden_size == 32 and vision.config.hidden_size == llm.config.hidden_size
    assert load_model_with_vision(tiny_model_dir)[1] is None  # text-only without the flag
