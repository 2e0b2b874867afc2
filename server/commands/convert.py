"""``moleserve convert SRC DST``: PEFT LoRA / MixLoRA / MoE-PEFT checkpoints into our bank format."""

from __future__ import annotations

import argparse

HELP = "convert a PEFT LoRA, MixLoRA or MoE-PEFT checkpoint into a moleserve bank folder"
PASSTHROUGH = True  # adapters.convert.cli parses SRC DST and the flags itself


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="SRC DST [--name NAME] [--model BASE_FOLDER]")


def run(args: argparse.Namespace) -> int:
    from adapters.convert.cli import main as convert_main

    return convert_main(list(args.argv))
