import os

# Triton kernels run under the interpreter on CPU-only machines.  Triton reads this when a kernel is
# decorated, and kernels.routed_lora imports its Triton module lazily, so setting it here suffices.
# It only changes how Triton runs; on a GPU machine set TRITON_INTERPRET=0 to test the real kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

