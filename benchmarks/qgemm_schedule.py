"""The base GEMMs of one decode step on our CPU kernel (kernels/quant_cpu.cpp): its column blocks
taken in turn (``schedule(dynamic, 1)``, this tree) against the same source with each thread's half
fixed (``schedule(static)``, the kernel before the thirteenth session), two builds in one process,
alternating.

A "step" is SmolLM2-135M's 30 layers of int4 weights (q|k|v, o, gate|up, down; distinct weights, so
they stream from memory as in the engine) and the int8 LM head, M rows each. ``--busy`` adds a process
that spins 2 ms of every 8 (an event loop's share of a core) beside the step.

    python benchmarks/qgemm_schedule.py [--rows 32] [--rounds 16] [--busy]

Prints min and median ms per step of each build and the paired median ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import quant_cpu  # noqa: E402
from kernels.cpp_build import load_cpp_library  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q|k|v, o, gate|up, down
BUSY = "import time\nwhile True:\n t = time.perf_counter()\n while time.perf_counter() - t < 0.002: pass\n time.sleep(0.006)"


def static_build(tmp: Path) -> ctypes.CDLL:
    src = (Path(quant_cpu.__file__).with_name("quant_cpu.cpp")).read_text()
    assert src.count("schedule(dynamic, 1)") == 2, "quant_cpu.cpp's schedules changed: update this benchmark"
    path = tmp / "quant_cpu_static.cpp"
    path.write_text(src.replace("schedule(dynamic, 1)", "schedule(static)"))
    lib = load_cpp_library(path, "quant_cpu (static)")
    assert lib is not None
    lib.ms_qpack_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.ms_qpack_bytes.restype = ctypes.c_int64
    lib.ms_qpack_int4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ms_qpack_int8.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.ms_qlinear.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def weights(lib: ctypes.CDLL) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(30):
        for n, k in SHAPES:
            codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
            out.append(quant_cpu.pack_int4(codes, torch.rand(n, k // 32, generator=g) * 0.01, torch.zeros(n, k // 32), 32, lib=lib))
    head = torch.randint(-127, 128, (49152, 576), generator=g, dtype=torch.int8)
    out.append(quant_cpu.pack_int8(head, torch.rand(49152, generator=g) * 0.01, lib=lib))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--busy", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"dynamic (this tree)": quant_cpu.load_library(), "static": static_build(Path(tmp))}
        ws = {name: weights(lib) for name, lib in libs.items()}
        M = args.rows
        xs = {k: torch.randn(M, k) for k in (576, 1536)}
        ys = {n: torch.empty(M, n) for n in (960, 576, 3072, 49152)}
        outs: dict[str, torch.Tensor] = {}

        def step(name: str) -> None:
            fn = libs[name].ms_qlinear
            for q in ws[name]:
                fn(q.c_handle, xs[q.in_features].data_ptr(), M, ys[q.out_features].data_ptr(), 2)

        for name in libs:  # same arithmetic: the LM head's output is bitwise the same
            step(name)
            outs[name] = ys[49152].clone()
        a, b = outs.values()
        assert torch.equal(a, b), "the two schedules computed different outputs"
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
        try:
            res: dict[str, list[float]] = {k: [] for k in libs}
            for r in range(args.rounds):
                for name in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
                    t = time.perf_counter()
                    for _ in range(3):
                        step(name)
                    res[name].append((time.perf_counter() - t) / 3 * 1e3)
        finally:
            if busy is not None:
                busy.kill()
    print(f"rows {M}, {'one core 25% busy' if args.busy else 'no added load'}, {args.rounds} rounds")
    for k, v in res.items():
        print(f"  {k}: min {min(v):.1f} ms, median {statistics.median(v):.1f} ms")
    d, s = res["dynamic (this tree)"], res["static"]
    print(f"  dynamic / static: median {statistics.median(d) / statistics.median(s):.3f}, "
          f"paired median {statistics.median([x / y for x, y in zip(d, s)]):.3f}")


if __name__ == "__main__":
    main()
