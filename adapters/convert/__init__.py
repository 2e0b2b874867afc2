"""Converters from the ecosystem's checkpoint formats (PEFT LoRA, MixLoRA, MoE-PEFT) to ExpertBank."""

from __future__ import annotations

import re
from pathlib import Path

from ..bank import ExpertBank
from ..errors import BankError
from ..fingerprint import BaseFingerprint
from ..validation import validate_bank
from .checkpoint import CONFIG_FILE, Checkpoint
from .moe_peft import convert_moe_peft, is_moe_peft
from .peft_lora import convert_peft_lora


def convert_checkpoint(folder: str | Path, *, base: BaseFingerprint | None, name: str | None = None) -> ExpertBank:
    """Read an ecosystem checkpoint folder into a validated ExpertBank (in memory; nothing written).

    ``base`` is the fingerprint of the model the adapter was trained on: the checkpoints do not
    record its sizes, and every tensor shape is checked against it. ``name`` defaults to the
    folder's name.
    """
    folder = Path(folder)
    label = name if name is not None else _name_from(folder.name)
    try:
        if base is None:
            raise BankError("converting a checkpoint needs the base model's fingerprint (pass base=, or --model)")
        ckpt = Checkpoint(folder)
        convert = convert_moe_peft if is_moe_peft(ckpt.config) else convert_peft_lora
        return validate_bank(convert(ckpt, base, label), file=ckpt.weights_file)
    except BankError as exc:
        raise exc.within(bank=label) from None


def _name_from(folder_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder_name).strip(".-_")[:128] or "bank"


def cli(argv: list[str]) -> int:
    """``moleserve convert SRC DST [--name NAME] [--model BASE_FOLDER]``; returns the exit code."""
    from .cli import main

    return main(argv)


__all__ = ["CONFIG_FILE", "cli", "convert_checkpoint"]
