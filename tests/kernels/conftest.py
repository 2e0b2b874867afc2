import os
import sys
from pathlib import Path

# Triton kernels run under the interpreter on CPU-only machines.  Triton reads this when a kernel is
# decorated, and kernels.routed_lora imports its Triton module lazily, so setting it here suffices.
# It only changes how Triton runs; on a GPU machine set TRITON_INTERPRET=0 to test the real kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest puts tests/ on sys.path (rootdir conftest), where tests/kernels would shadow the `kernels`
# package as a namespace package ahead of the editable install's finder.  Put the repo root first.
_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[0] != _ROOT:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("kernels"), "__file__", "") is None:
    del sys.modules["kernels"]  # a namespace package imported before this ran
