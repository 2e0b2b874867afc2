"""Arguments and helpers shared by subcommands that load the base model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local Hugging Face folder of a Llama-family model or a Parrot (parrot_qwen2) checkpoint "
                             "(default: the embedded SmolLM2-135M-Instruct)")


def add_vision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", default=None, metavar="DIR",
                        help="local transformers folder of the vision tower (CLIP, SigLIP, Dinov2): a Parrot "
                             "checkpoint's (wins over its mm_vision_tower), or one for a Llama-family model")


def resolve_model_path(model: str | None) -> Path:
    """The --model folder, or the embedded default (converted once into the cache)."""
    if model:
        return Path(model).expanduser()
    from server.model import ensure_default_model

    return ensure_default_model()
