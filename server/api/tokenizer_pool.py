"""The threads that render chat templates and tokenize, off the event loop.

HF fast tokenizers must not be called from several threads at once ("Already borrowed"), so each
worker thread works on its own copy (made here, at start, while nothing else uses the original);
with more than one worker a 1 MiB body no longer delays every other request's tokenization by
seconds.

    pool = TokenizerPool(tokenizer, workers=2)
    ids = await pool.run(lambda tok: tok("hello")["input_ids"])
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, tokenizer: Any, workers: int = 2):
        self.tokenizer = tokenizer  # the original: the event loop's own (cheap single-token decodes)
        self.workers = workers
        self._local = threading.local()
        self._copies = [copy.deepcopy(tokenizer) for _ in range(workers)] if workers > 1 else [tokenizer]
        self._copy_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        # Upper bound of the text characters one token covers: a text longer than the context window
        # times this cannot fit, whatever the template adds, so it is refused before tokenizing.
        try:
            self.max_chars_per_token = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
                                           if t) or 1
        except Exception:  # noqa: BLE001 - a tokenizer without a listable vocabulary: no early refusal
            self.max_chars_per_token = None

    def current(self) -> Any:
        """The calling worker thread's tokenizer copy (the original on any other thread)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            if not threading.current_thread().name.startswith("tokenize"):
                return self.tokenizer
            with self._copy_lock:  # each worker thread takes one copy for good
                tok = self._local.tokenizer = self._copies.pop()
        return tok

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread; inside it, ``current()`` is that thread's tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
