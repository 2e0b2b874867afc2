"""What the registry needs to keep banks resident within bounds and to load them on demand.

Three tiers hold a bank: the bank roots on disk, host memory (at most ``max_loaded`` banks, least
recently used idle ones evicted first) and the device expert pool (``pool_memory_bytes``). This
module holds the bookkeeping around them that is not the registry's maps: the counters that
/metrics shows (``ResidencyStats``), the bounded negative cache of names that did not load
(``NegativeCache``), and the lookup of ``<root>/<name>`` (``find_on_disk``).
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TIERS = ("disk", "host", "pool")
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

# A bank name on demand is one folder name: no separators, no "..", nothing hidden.
ON_DEMAND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The files whose change makes a cached load failure stale (see ``NegativeCache``).
BANK_FILES = ("bank.json", "weights.safetensors", "adapter_config.json", "adapter_model.safetensors",
              "adapter_model.bin", "experts.safetensors")


def valid_on_demand_name(name: str) -> bool:
    return isinstance(name, str) and bool(ON_DEMAND_NAME.match(name)) and ".." not in name


def find_on_disk(name: str, roots: list[Path]) -> Path | None:
    """The first ``<root>/<name>`` that is a folder (one ``stat`` per root), or None. Plain string
    paths until a folder is found: pathlib interns every part, and the names of a flood of
    requests for banks that do not exist should not grow the interpreter's interned strings."""
    for root in roots:
        candidate = os.path.join(os.fspath(root), name)
        try:
            if os.path.isdir(candidate):
                return Path(candidate)
        except (OSError, ValueError):  # a name the file system refuses (too long, ...) is simply not there
            continue
    return None


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def roots_signature(roots: list[Path]) -> tuple:
    """Changes when a folder is added to or removed from any root (its directory mtime moves)."""
    return tuple(_mtime(r) for r in roots)


def folder_signature(folder: Path) -> tuple:
    """Changes when the bank folder or one of its bank files is rewritten."""
    return (_mtime(folder), *(_mtime(folder / f) for f in BANK_FILES))


@dataclass
class _Miss:
    error: Exception
    expires: float
    signature: tuple
    folder: Path | None  # None: no such folder (the signature is the roots'); else the folder that failed


class NegativeCache:
    """Names that were not found, or whose files failed to load, so that a request for them does
    not touch the disk (or retry a broken load) again. An entry holds until ``ttl`` seconds pass or
    the folder changes (for a missing name: any root's listing; for a failed load: the folder or
    its bank files), whichever is first. At most ``capacity`` entries, the least recently asked for
    dropped first:
    a flood of distinct names costs bounded memory and no open files."""

    def __init__(self, ttl: float = 30.0, capacity: int = 4096):
        self.ttl, self.capacity = ttl, capacity
        self._entries: collections.OrderedDict[str, _Miss] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, roots: list[Path]) -> Exception | None:
        """The cached error for ``name`` while it holds, else None."""
        with self._lock:
            miss = self._entries.get(name)
            if miss is not None:
                self._entries.move_to_end(name)  # least recently asked for leaves first
        if miss is None:
            return None
        sig = roots_signature(roots) if miss.folder is None else folder_signature(miss.folder)
        if time.monotonic() >= miss.expires or sig != miss.signature:
            self.forget(name)
            return None
        return miss.error

    def put(self, name: str, error: Exception, roots: list[Path], folder: Path | None = None) -> None:
        sig = roots_signature(roots) if folder is None else folder_signature(folder)
        with self._lock:
            self._entries.pop(name, None)
            self._entries[name] = _Miss(error, time.monotonic() + self.ttl, sig, folder)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)


@dataclass
class ResidencyStats:
    """Counters behind the residency series of /metrics (read at scrape time).

    loads: (trigger, result) -> count, trigger ``on_demand`` or ``admin`` (start, admin API);
    hits / misses: tier -> count, per request: ``host`` hit when its bank was in host memory,
    miss when it had to come from disk; ``pool`` hit when it was in the expert pool, miss when a
    step had to copy it in. evictions: tier -> count (``host``: back to disk only; ``pool``: back
    to host memory only). load_seconds: cumulative bucket counts over ``LOAD_BUCKETS``, sum, count."""

    loads: collections.Counter = field(default_factory=collections.Counter)
    hits: collections.Counter = field(default_factory=collections.Counter)
    misses: collections.Counter = field(default_factory=collections.Counter)
    evictions: collections.Counter = field(default_factory=collections.Counter)
    load_buckets: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    load_sum: float = 0.0
    load_count: int = 0
    resident: dict = field(default_factory=dict)  # tier -> banks there now (filled by the snapshot)

    def observe_load(self, seconds: float) -> None:
        i = next((k for k, edge in enumerate(LOAD_BUCKETS) if seconds <= edge), len(LOAD_BUCKETS))
        self.load_buckets[i] += 1
        self.load_sum += seconds
        self.load_count += 1

    def copy(self) -> "ResidencyStats":
        return ResidencyStats(collections.Counter(self.loads), collections.Counter(self.hits),
                              collections.Counter(self.misses), collections.Counter(self.evictions),
                              list(self.load_buckets), self.load_sum, self.load_count, dict(self.resident))
