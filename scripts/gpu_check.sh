#!/usr/bin/env bash
# The GPU check (issue #18): one run of at most ~8 minutes on one GPU that proves the CUDA path and
# prints the table for BENCHMARKS.md ("GPU"). It needs only what a bare GPU machine holds: torch,
# triton, transformers (tokenizers and safetensors come with it) and numpy; it fetches nothing.
#   - benchmarks/gpu.py includes decode tok/s eager vs CUDA graphs (section "graphs", the first size).
#   - wheels placed under .whl/ are installed first with --no-deps: peft (the transformers + PEFT
#     comparison; without it that row says "not measured") and pytest (the kernel tests on CUDA;
#     without it the same checks still run inside benchmarks/gpu.py).
#
#   scripts/gpu_check.sh [benchmarks/gpu.py options, e.g. --sizes 1b,8b --seqs 64 --tokens 128]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONPATH=.
shopt -s nullglob
for w in .whl/*.whl; do "$PY" -m pip install -q --no-deps --no-index "$w" || echo "could not install $w"; done
"$PY" - <<'PY' || exit 2
import torch, triton, transformers
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "on", torch.cuda.get_device_name(0))
PY
status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== kernel tests on CUDA (Triton compiled, not interpreted)"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention_triton.py \
    -k "not engine" || status=1
else
  echo "== pytest not installed: kernel tests skipped (benchmarks/gpu.py checks the kernels below)"
fi
echo "== benchmarks/gpu.py $*"
timeout 400 "$PY" benchmarks/gpu.py "$@" || status=1
exit $status
