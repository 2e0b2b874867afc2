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


def test_gpu_check_graphs_section_runs_the_graph_runner_on_cpu():
    """The graphs section's dry run: the graph runner's static-buffer path, eagerly (nothing captured
    off CUDA); it exits non-zero if no decode step went through the runner."""
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--sizes", "tiny", "--sections", "graphs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| graphs | tiny: capture of decode batch sizes [1, 2, 4, 8, 16, 24, 32]" in out.stdout
    assert "eager vs graph runner" in out.stdout and "greedy tokens equal in 3/3" in out.stdout


def test_gpu_check_script_refuses_without_cuda():
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 2 and "no CUDA device" in out.stderr
