"""Loading fails cleanly: one clear line naming the problem and exit code 2, not a stack trace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from server.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *argv):
    code = main(["generate", *argv, "hi", "--max-tokens", "1"])
    err = capsys.readouterr().err.strip()
    return code, err


def _weights(folder):
    return folder / "model.safetensors"


def test_missing_path(capsys, tmp_path):
    code, err = _run(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_path_is_a_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, err = _run(capsys, "--model", str(f))
    assert code == 2 and "is not a folder" in err


def test_folder_without_config(capsys, tmp_path):
    code, err = _run(capsys, "--model", str(tmp_path))
    assert code == 2 and "config.json" in err and "missing" in err


def test_config_not_json(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "not valid JSON" in err


def test_not_llama_family(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "'gpt2' is not a supported Llama-family model" in err


def test_missing_tensor(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    state = load_file(str(_weights(folder)))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(_weights(folder)))
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "missing tensor model.layers.1.mlp.up_proj.weight" in err


def test_misshaped_tensor(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    state = load_file(str(_weights(folder)))
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    save_file(state, str(_weights(folder)))
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "model.layers.0.self_attn.k_proj.weight has shape (31, 64), expected (32, 64)" in err


def test_truncated_safetensors(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[: len(data) // 2])
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "cannot read safetensors" in err


def test_nan_weights(capsys, tmp_path, tiny_model_dir):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    state = load_file(str(_weights(folder)))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(_weights(folder)))
    code, err = _run(capsys, "--model", str(folder))
    assert code == 2 and "NaN or inf" in err


@pytest.mark.slow
def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", str(tmp_path / "missing"), "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("does not exist")
