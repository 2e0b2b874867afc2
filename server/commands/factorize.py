"""``moleserve factorize``: split the base model's FFNs into routed experts (FactorLLM) as a ``factor`` bank."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_argument, resolve_model_path

HELP = "factorise the model's dense FFNs into E routed experts (FactorLLM) and write a 'factor' bank"
SHARED_CALIBRATION = Path(__file__).resolve().parents[3] / "shared" / "data" / "commonsense"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--experts", type=int, required=True, metavar="E", help="experts per FFN (must divide intermediate_size)")
    parser.add_argument("--top-k", type=int, required=True, metavar="K", help="experts each token runs (K = E: the dense FFN)")
    parser.add_argument("--out", required=True, metavar="DIR", help="bank folder to write")
    parser.add_argument("--name", default=None, help="bank name (default: the folder's name)")
    parser.add_argument("--calib-steps", type=int, default=200, metavar="N", help="router training steps (default 200)")
    parser.add_argument("--calib-data", action="append", default=None, metavar="FILE",
                        help="calibration text: .txt, or .json/.jsonl records (repeatable; default: the shared "
                             "commonsense train sets)")
    parser.add_argument("--tokens-per-step", type=int, default=1024, help="calibration tokens per step (default 1024)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    parser.add_argument("--permutation", choices=("coact", "weights", "contiguous"), default="coact",
                        help="neuron grouping: co-activation clusters (default), weight-row clusters, or plain slices")
    parser.add_argument("--rescale", choices=("fit", "release", "none"), default="fit",
                        help="output scale of the chosen experts: least squares (default), E/K as released, or 1")
    parser.add_argument("--lr", type=float, default=5e-3, help="router learning rate (Adam)")
    parser.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                        help="then train the expert slices with the LM loss of the factorised model for N AdamW "
                             "steps on the same text (default 0: off; the bank then stores the FFN weights, "
                             "~2x the model's FFN size in fp32)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from server.cli import UserError

    if args.experts < 1 or not 1 <= args.top_k <= args.experts:
        raise UserError(f"need 1 <= --top-k <= --experts, got --experts {args.experts} --top-k {args.top_k}")
    if args.calib_steps < 1 or args.seq_len < 2 or args.tokens_per_step < args.seq_len:
        raise UserError("need --calib-steps >= 1 and --tokens-per-step >= --seq-len >= 2")
    if args.finetune_steps < 0 or not args.finetune_lr > 0:
        raise UserError("need --finetune-steps >= 0 and --finetune-lr > 0")
    path = resolve_model_path(args.model)

    from transformers import AutoTokenizer

    from adapters import BaseFingerprint
    from adapters.factor.calibrate import FactorConfig, calibration_sequences, factorize, save_report
    from server.model import load_model

    model = load_model(path)
    inter = model.config.intermediate_size
    if inter % args.experts:
        raise UserError(f"--experts {args.experts} does not divide the model's intermediate_size {inter}")
    files = args.calib_data or sorted(SHARED_CALIBRATION.glob("*/train.json"))
    if not files:
        raise UserError(f"no calibration text: pass --calib-data FILE ({SHARED_CALIBRATION} has none)")
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"--calib-data {f}: no such file")
    seqs_per_step = args.tokens_per_step // args.seq_len
    tokenizer = AutoTokenizer.from_pretrained(path)
    seqs = calibration_sequences(tokenizer, files, args.seq_len, seed=args.seed,
                                 max_tokens=args.calib_steps * seqs_per_step * args.seq_len)
    cfg = FactorConfig(experts=args.experts, top_k=args.top_k, permutation=args.permutation, rescale=args.rescale,
                       lr=args.lr, seed=args.seed)
    out = Path(args.out)
    base = BaseFingerprint.from_hf_config(model.config.raw)
    [(bank, report)] = factorize(model, base, seqs, [cfg], steps=args.calib_steps, seqs_per_step=seqs_per_step,
                                 names=[args.name or out.name], log=lambda s: print(s, flush=True))
    finetune = None
    if args.finetune_steps:
        from adapters.factor.finetune import finetune_factor_bank

        bank, finetune = finetune_factor_bank(model, bank, seqs, steps=args.finetune_steps, seqs_per_step=seqs_per_step,
                                              lr=args.finetune_lr, log=lambda s: print(s, flush=True))
    bank.save(out)
    save_report(report, out)
    if finetune is not None:
        (out / "finetune.json").write_text(json.dumps(finetune, indent=1) + "\n")
    print(f"wrote {out} ({bank.nbytes() / 1e6:.1f} MB): {report.summary()}"
          + ("" if finetune is None else f"; fine-tuning loss {finetune['loss_first_last']}"))
    return 0
