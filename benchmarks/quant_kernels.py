"""The base GEMMs of one SmolLM2-135M layer (q|k|v, o, gate|up, down) and the LM head: fp32 on
oneDNN-packed weights (``--quantization none``) vs torch's packed int4 / int8 kernels with bf16 and
fp32 input, at M rows; systems alternate within each repeat. Prints us per call (min and median).

    python benchmarks/quant_kernels.py [--threads 1] [--rows 1 8 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from server.model.quantization import Int4Weight, Int8Weight  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in] of q|k|v, o, gate|up, down
HEAD = (49152, 576)


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ws = {s: torch.randn(*s, generator=g) for s in SHAPES}
    head = torch.randn(*HEAD, generator=g)
    packed = {s: torch.ops.mkldnn._reorder_linear_weight(w, 32) for s, w in ws.items()}
    q4 = {s: Int4Weight.quantize(w) for s, w in ws.items()}
    q4_fp32 = {s: Int4Weight.quantize(w, compute_dtype=torch.float32) for s, w in ws.items()}
    q8 = {s: Int8Weight.quantize(w) for s, w in ws.items()}
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head, 32)
    head8, head4 = Int8Weight.quantize(head), Int4Weight.quantize(head)

    def layer(kind, x, xm):
        for s in SHAPES:
            inp = xm if s[1] == 1536 else x
            if kind == "fp32":
                torch.ops.mkldnn._linear_pointwise(inp, packed[s], None, "none", [], "")
            else:
                w, dtype = {"int4 bf16": (q4, torch.bfloat16), "int8 bf16": (q8, torch.bfloat16),
                            "int4 fp32 input": (q4_fp32, torch.float32)}[kind]
                w[s].kernel(inp.to(dtype))

    print(f"torch {torch.__version__}, {args.threads} thread(s); us per call, min (median) of {args.repeats}\n")
    print("| rows | one layer fp32 packed | int4 bf16 | int8 bf16 | int4 fp32 input | LM head fp32 packed | head int8 bf16 | head int4 bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.rows:
        x, xm = torch.randn(m, 576, generator=g), torch.randn(m, 1536, generator=g)
        res: dict[str, list[float]] = {}
        fns = {k: (lambda k=k: layer(k, x, xm)) for k in ("fp32", "int4 bf16", "int8 bf16", "int4 fp32 input")}
        fns["head fp32"] = lambda: torch.ops.mkldnn._linear_pointwise(x, head_packed, None, "none", [], "")
        fns["head int8"] = lambda: head8.kernel(x.bfloat16())
        fns["head int4"] = lambda: head4.kernel(x.bfloat16())
        for _ in range(args.repeats):
            for k, f in fns.items():
                res.setdefault(k, []).append(timed(f, 3 if k.startswith("head") or "fp32 input" in k else 20))
        cells = [f"{min(v):,.0f} ({statistics.median(v):,.0f})" for v in res.values()]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
