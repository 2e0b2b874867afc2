"""The encoder cache: a bounded LRU of tower + projector outputs, keyed by the image's content hash
(and the identity of the projector that made them).

Tower + projector output depends on the image alone (ALGORITHMS.md §5, serving consequence (a)), so
the same image sent again (a conversation's next turn, several users asking about one picture)
skips the vision tower. The mixture is never cached here: it depends on each prompt's text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class EncoderCache:
    """key -> tensor [N, D], at most ``max_bytes`` of tensors; the least recently used go first.
    A tensor larger than the whole budget is not kept. Thread-safe (the step thread writes, the
    metrics scrape reads the counters)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"encoder cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._items.get(key)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            if size > self.max_bytes:
                return
            while self._items and self.bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
            self._items[key] = value
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
