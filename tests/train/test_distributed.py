"""``torchrun --nproc-per-node 2`` (gloo, CPU) gives the same bank as one process with the same
global batch: micro-batch j of a step goes to rank j % 2 and its dropout is seeded by (step, j)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from adapters import load_bank


def _args(train_file, tiny_model_dir, out):
    return ["train", "--model", str(tiny_model_dir), "--data", str(train_file), "--out", str(out),
            "--experts", "3", "--rank", "4", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
            "--lr", "5e-3", "--cutoff", "96", "--threads", "1", "--no-progress"]


@pytest.mark.timeout(300)
def test_two_process_ddp_equals_one_process(train_file, tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "server.cli",
                          *_args(train_file, tiny_model_dir, tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    from server.cli import main

    assert main(_args(train_file, tiny_model_dir, tmp_path / "single")) == 0
    a = load_bank(tmp_path / "ddp").named_tensors()
    b = load_bank(tmp_path / "single").named_tensors()
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
        if key.endswith("lora_b"):
            moved += float(a[key].abs().sum())
    assert moved > 0  # B starts at zero: the runs really trained
