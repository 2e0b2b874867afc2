"""Ecosystem checkpoints (PEFT LoRA, MixLoRA, MoE-PEFT) converted once: the converted bank is kept in
this project's format under a cache folder, keyed by the checkpoint's real path, its files'
modification times and sizes and the served model's fingerprint, so an on-demand bank evicted and
requested again (or a server restarted) reads one safetensors file instead of converting again.
A checkpoint rewritten in place gets a new key; stale entries are simply never read again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from adapters import BankError, BaseFingerprint, ExpertBank
from adapters.storage import META_FILE, load_saved_bank, save_bank

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"


def is_ecosystem_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and not (folder / META_FILE).exists()


class ConvertedCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def key(self, source: Path, base: BaseFingerprint) -> str:
        h = hashlib.sha256(str(source).encode())
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(repr(base).encode())
        return h.hexdigest()[:32]

    def get(self, source: Path, base: BaseFingerprint, name: str, max_bytes: int | None = None) -> ExpertBank | None:
        """The converted bank, or None when it is not cached (or the cached copy does not load)."""
        entry = self.folder / self.key(source, base)
        if not (entry / META_FILE).exists():
            return None
        try:
            return load_saved_bank(entry, base=base, name=name, max_bytes=max_bytes)
        except BankError as exc:  # a damaged cache entry: convert again
            log.warning("converted-bank cache entry %s not used: %s", entry, exc)
            return None

    def put(self, source: Path, base: BaseFingerprint, bank: ExpertBank) -> None:
        """Keep ``bank`` (converted from ``source``); a failure to write only costs the next conversion."""
        entry = self.folder / self.key(source, base)
        tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
        try:
            save_bank(bank, tmp)
            os.replace(tmp, entry)
        except OSError as exc:
            log.warning("converted bank %s not cached: %s", source, exc)
            shutil.rmtree(tmp, ignore_errors=True)
