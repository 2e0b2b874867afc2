"""benchmarks/gpu.py (run by scripts/gpu_check.sh on a lent GPU) runs its checks on the CPU at toy
sizes, so the script is known to work before a GPU is lent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_at_toy_sizes():
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--sections", "kernels,greedy"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| kernels | paged attention (Triton) vs torch" in out.stdout
    assert "| kernels | routed LoRA (Triton; dynamic and static plans) vs torch" in out.stdout
    assert "4/4 equal" in out.stdout


def test_gpu_check_script_refuses_without_cuda():
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 2 and "no CUDA device" in out.stderr
