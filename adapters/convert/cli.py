"""``moleserve convert SRC DST [--name NAME] [--model BASE_FOLDER]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import BankError
from ..fingerprint import BaseFingerprint

USAGE = "moleserve convert SRC DST [--name NAME] [--model BASE_FOLDER]"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, not argparse's usage dump
        raise _UsageError(message)


def main(argv: list[str]) -> int:
    parser = _Parser(
        prog="moleserve convert",
        usage=USAGE,
        description="Convert a PEFT LoRA, MixLoRA or MoE-PEFT checkpoint (or re-save a bank) into this "
        "server's bank format: DST/bank.json + DST/weights.safetensors.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint folder (adapter_config.json + adapter_model.*) or bank folder")
    parser.add_argument("dst", metavar="DST", help="output folder; must not exist or be empty")
    parser.add_argument("--name", help="bank name (default: the source folder's name)")
    parser.add_argument("--model", help="base model folder (its config.json gives the fingerprint)")
    try:
        args = parser.parse_args(argv)
        bank = _convert(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        print(f"moleserve convert: {exc} (usage: {USAGE})", file=sys.stderr)
        return 2
    except BankError as exc:
        print(f"moleserve convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bank {bank.name!r} ({bank.kind}, {bank.num_experts()} experts, {bank.nbytes()} bytes) to {args.dst}")
    return 0


def _convert(args: argparse.Namespace):
    from ..loader import load_bank

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise _UsageError(f"DST {args.dst!r} exists and is not an empty folder")
    base = _fingerprint(args.model) if args.model is not None else _default_fingerprint()
    bank = load_bank(args.src, base=base, name=args.name)
    try:
        bank.save(dst)
    except OSError as exc:
        raise _UsageError(f"cannot write {args.dst!r}: {exc.strerror or exc}") from None
    return bank


def _fingerprint(model_folder: str, label: str | None = None) -> BaseFingerprint:
    label = label or f"--model {model_folder!r}"
    path = Path(model_folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _UsageError(f"{label}: cannot read config.json ({exc})") from None
    try:
        return BaseFingerprint.from_hf_config(raw)
    except BankError as exc:
        raise _UsageError(f"{label}: {exc}") from None


def _default_fingerprint() -> BaseFingerprint | None:
    """The server's default model, when ``server.model`` provides one; None otherwise (a bank in
    our format then converts without a check, and an ecosystem checkpoint asks for --model)."""
    try:
        from server.model import default_model_path
    except ImportError:
        return None
    folder = default_model_path()
    if not (Path(folder) / "config.json").is_file():
        raise _UsageError(f"no --model given and the default model is not prepared at {str(folder)!r}; pass --model BASE_FOLDER")
    return _fingerprint(str(folder), label=f"default model {str(folder)!r}")
