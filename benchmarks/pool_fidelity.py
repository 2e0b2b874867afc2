"""What a bank pool's storage dtype does to a decode's output: the engine ``moleserve serve --banks``
builds (the int4 base), 8 random DynMoLE banks (benchmarks/banks.py), 32 requests of 16-token
prompts over the 8 banks (4 rows a bank, as issue #21's served table), 32 greedy tokens each, with
the pool in float32 and in ``--dtype`` (int8 by default: the packed pool where the kernel build has
VNNI). Prints the share of equal tokens, the sequences identical throughout, and the difference of
the sampled tokens' log-probabilities (over each sequence's tokens up to its first divergence).

    python benchmarks/pool_fidelity.py [--dtype int8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    from banks import PROMPT_LEN, save_dynmole_banks
    from served import in_process_engine, serve_flags

    from adapters import BaseFingerprint
    from server.engine.protocol import GenerationRequest, SamplingParams
    from server.model import ModelConfig, ensure_default_model

    folder = ensure_default_model()
    cfg = ModelConfig.from_folder(folder)
    fp = BaseFingerprint.from_hf_config(cfg.raw)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist() for _ in range(32)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = save_dynmole_banks(Path(tmp), fp)
        for dtype in ("float32", args.dtype):
            engine = in_process_engine([*serve_flags(64, []), "--banks", tmp, "--bank-dtype", dtype])
            reqs = [GenerationRequest(f"{dtype}-{i}", p, params, bank=names[i % 8]) for i, p in enumerate(prompts)]
            events = engine.generate(reqs)
            out[dtype] = [([t for e in events[r.request_id] for t in e.token_ids],
                           [lp for e in events[r.request_id] for lp in (e.logprobs or [])]) for r in reqs]
            del engine
    equal = total = identical = 0
    diffs = []
    for (ta, la), (tb, lb) in zip(out["float32"], out[args.dtype]):
        total += len(ta)
        equal += sum(a == b for a, b in zip(ta, tb))
        identical += ta == tb
        for k, (a, b) in enumerate(zip(ta, tb)):
            if a != b:
                break
            diffs.append(la[k].logprob - lb[k].logprob)
    d = torch.tensor(diffs, dtype=torch.float64)
    print(f"{args.dtype} pool vs float32 pool, 32 requests x {args.new_tokens} greedy tokens over 8 DynMoLE banks: "
          f"tokens equal {100 * equal / total:.1f}%, sequences identical {identical}/32; sampled tokens' "
          f"log-probability difference {d.pow(2).mean().sqrt():.5f} rms, {d.abs().max():.4f} max, over {len(diffs)} tokens")


if __name__ == "__main__":
    main()
