"""``moleserve train``: train a bank (dynmole, mixlora or lora) on a frozen base model.

Runs alone or under ``torchrun --nproc-per-node N -m server.cli train ...`` (DDP).
"""

from __future__ import annotations

import argparse

from .common import add_model_argument

HELP = ("train an expert bank (dynmole, mixlora, lora) from LLM-Adapters JSON or chat JSONL, or a parrot bank "
        "(projector + visual mixture) from LLaVA-format image-text JSON")

# flag -> TrainConfig field, for flags given explicitly (they override the --config file)
_FIELDS = ("model", "kind", "name", "experts", "rank", "alpha", "targets", "top_k", "lr", "weight_decay",
           "batch_size", "micro_batch_size", "epochs", "max_steps", "max_seconds", "cutoff", "limit", "dropout",
           "entropy_coef", "balance_coef", "seed", "save_every", "threads", "out",
           "vision_tower", "image_folder", "stage", "init", "projector_type", "moe_intermediate_size", "moe_weight",
           "select_layer", "select_feature")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of training options (flags override it)")
    parser.add_argument("--data", action="append", metavar="FILE",
                        help="training file (repeatable): LLM-Adapters JSON or chat JSONL")
    parser.add_argument("--out", metavar="DIR", help="bank folder to write (checkpoints resume from it)")
    parser.add_argument("--kind", choices=("dynmole", "mixlora", "lora", "parrot"), help="default: dynmole")
    parser.add_argument("--name", help="bank name (default: the output folder's name)")
    parser.add_argument("--experts", type=int, help="experts per router (dynmole 6, mixlora 8)")
    parser.add_argument("--rank", type=int, help="LoRA rank (dynmole 24, mixlora 16, lora 16)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--targets", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                        help="comma-separated projections (dynmole/lora: gate_proj,up_proj,down_proj; mixlora: all)")
    parser.add_argument("--top-k", type=int, help="mixlora: experts per token (default 2)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate, constant (default 2e-4)")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--batch-size", type=int, help="global batch in sequences (default 16)")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward (default 4); the rest is accumulated")
    parser.add_argument("--epochs", type=float, help="default 2")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--max-seconds", type=float, help="stop after the step that crosses this wall time")
    parser.add_argument("--cutoff", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--limit", type=int, help="train on a seeded random subset of this many records")
    parser.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    parser.add_argument("--entropy-coef", type=float, help="dynmole entropy loss weight (default 0.01)")
    parser.add_argument("--balance-coef", type=float, help="load-balance loss weight (default 0.001)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parrot = parser.add_argument_group("kind parrot (ALGORITHMS.md §5; --data: LLaVA JSON, --experts: visual experts)")
    parrot.add_argument("--vision-tower", metavar="DIR", help="the frozen vision tower: a local transformers folder")
    parrot.add_argument("--image-folder", metavar="DIR", help="image paths are relative to it (default: the data file's folder)")
    parrot.add_argument("--stage", type=int, choices=(1, 2), help="1: the projector alone; 2 (default): projector + mixture")
    parrot.add_argument("--init", metavar="BANK", help="start from this parrot bank (e.g. stage 1's, for stage 2)")
    parrot.add_argument("--projector-type", help="linear or mlp<N>x_gelu (default mlp2x_gelu)")
    parrot.add_argument("--moe-intermediate-size", type=int, help="the experts' hidden size (default: the LLM's)")
    parrot.add_argument("--moe-weight", type=float, help="lambda in sum_e w_e E_e(Hv) + lambda Hv (default 1)")
    parrot.add_argument("--select-layer", type=int, help="the tower's hidden state to use (default -2)")
    parrot.add_argument("--select-feature", choices=("cls_patch", "patch"), help="keep the CLS token (default) or not")


def run(args: argparse.Namespace) -> int:
    from adapters.train import ConfigError, DataError, TrainConfig, train

    from server.cli import UserError

    try:
        cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
        for key in _FIELDS:
            value = getattr(args, key, None)
            if value is not None:
                setattr(cfg, key, value)
        if args.data:
            cfg.data = list(args.data)
        if args.no_progress:
            cfg.progress = False
        result = train(cfg)
    except (ConfigError, DataError, OSError) as exc:
        raise UserError(str(exc)) from None
    if result.history and result.is_main:
        last = result.history[-1]
        print(f"wrote {result.out} ({result.trainable_params:,} trainable parameters, {result.steps} steps, "
              f"last loss {last['loss']:.4f}, {result.tokens_per_s:.0f} tokens/s)")
    return 0
