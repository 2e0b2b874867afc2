"""``load_bank``: one entry point for every bank folder the server may be given."""

from __future__ import annotations

from pathlib import Path

from .bank import ExpertBank
from .convert import CONFIG_FILE, convert_checkpoint
from .errors import BankError
from .fingerprint import BaseFingerprint
from .storage import META_FILE, load_saved_bank


def load_bank(path: str | Path, *, base: BaseFingerprint | None = None, name: str | None = None,
              max_bytes: int | None = None) -> ExpertBank:
    """Load the bank at ``path``: this project's format (``bank.json``) as it is, an ecosystem
    checkpoint (``adapter_config.json``: PEFT LoRA, MixLoRA, MoE-PEFT mixlora / mixlora-dynamic /
    dynmole / mola) converted in memory.

    ``base``: the served model's fingerprint. Our format is refused when it does not match;
    converting requires it. ``name`` replaces the bank's name (default: the stored name, or the
    checkpoint folder's name); refusals name the bank by it. ``max_bytes``: the fp32 bytes the
    declared tensors may take (our format: checked before the weights are read). Raises
    BankError; a bank that is returned is fully validated.
    """
    folder = Path(path)
    if folder.is_file() and folder.name in (META_FILE, CONFIG_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise BankError(f"bank path {str(path)!r} does not exist or is not a folder")
    if (folder / META_FILE).exists():
        file, load = META_FILE, lambda: load_saved_bank(folder, base=base, name=name, max_bytes=max_bytes)
    elif (folder / CONFIG_FILE).exists():
        file, load = CONFIG_FILE, lambda: convert_checkpoint(folder, base=base, name=name)
    else:
        raise BankError(f"bank path {str(path)!r} holds neither {META_FILE} nor {CONFIG_FILE}")
    try:
        return load()
    except BankError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
            RuntimeError, MemoryError) as exc:
        # A value of a type no check foresaw: still the client's file, so a refusal, never a 500.
        text = " ".join(str(exc).split())[:200]
        raise BankError(f"malformed ({type(exc).__name__}: {text})", bank=name or folder.name, file=file) from None
