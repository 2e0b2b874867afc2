"""The banks a Ray Serve application may serve: names -> validated folders, kept by the ingress.

The ingress has no engine and no device pool: it validates a bank the way a replica's registry
would (path inside the allowed roots, format, base-model fingerprint) and remembers its folder and a
version number. Replicas load banks from this catalog on demand through Serve's multiplex loader
(server/distributed/ray_serve.py); a replace bumps the version, so replicas holding the old one
reload it before their next request for it. Implements ``server.api.banks.BankAdmin``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters import BankError, BaseFingerprint, load_bank
from adapters.runtime.registry import (BankLoadError, BankNotFound, checked_bank_request, load_bank_folders)
from server.api.banks import BankInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: str
    version: int
    kind: str
    num_experts: int
    label: str | None = None  # the bank's own version string


class BankCatalog:
    def __init__(self, fingerprint: BaseFingerprint, allowed_roots=()):
        self.fingerprint = fingerprint
        self.allowed_roots = [Path(r) for r in allowed_roots]
        self._entries: dict[str, CatalogEntry] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # -- BankAdmin ---------------------------------------------------------------------------------

    def list(self) -> list[BankInfo]:
        with self._lock:
            entries = list(self._entries.values())
        return [BankInfo(e.name, e.kind, e.num_experts, e.version, extra={"source": e.path, "bank_version": e.label})
                for e in entries]

    async def load(self, name: str, path: str) -> BankInfo:
        entry = await asyncio.to_thread(self.load_sync, name, path)
        return next(b for b in self.list() if b.name == entry.name)

    async def unload(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise BankNotFound(f"bank {name!r} is not loaded")

    # -- the ingress -------------------------------------------------------------------------------

    def load_sync(self, name: str, path: str | Path) -> CatalogEntry:
        """Validate the bank at ``path`` (the same checks and errors as a replica's registry), then
        record it under ``name``; replicas load it when a request needs it."""
        real = checked_bank_request(name, path, self.allowed_roots)
        try:
            bank = load_bank(real, base=self.fingerprint, name=name)
        except BankError as exc:
            raise BankLoadError(str(exc)) from None
        with self._lock:
            entry = CatalogEntry(name, str(real), next(self._counter), bank.kind, bank.num_experts(), bank.version)
            self._entries[name] = entry
        return entry

    def add_root(self, root: str | Path) -> None:
        with self._lock:
            if Path(root) not in self.allowed_roots:
                self.allowed_roots.append(Path(root))

    def load_dir(self, folder: str | Path) -> tuple[list[str], list[str]]:
        """Every bank folder under ``folder`` (name = folder name); ``folder`` becomes an allowed root."""
        return load_bank_folders(self, folder, log)

    def locations(self, model: str) -> dict[str, tuple[str, int]]:
        """Folder and version of each bank ``model`` names ("a" or "factor+a"); what a replica's
        multiplex loader needs."""
        with self._lock:
            return {part: (e.path, e.version) for part in model.split("+") if (e := self._entries.get(part))}
