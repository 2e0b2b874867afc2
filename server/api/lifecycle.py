"""Admission and graceful shutdown: which requests may enter, and waiting for those inside.

On SIGTERM the server stops admitting (new requests get 503, /ready turns 503 so a load balancer
drains it), lets in-flight generations finish within the grace period, aborts what is left, and
then exits.
"""

from __future__ import annotations

import asyncio
import time


class Admission:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def drain(self, grace_period: float) -> bool:
        """Stop admitting and wait up to ``grace_period`` seconds for in-flight requests; True if
        they all finished."""
        self.draining = True
        deadline = time.monotonic() + grace_period
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - time.monotonic()))
            return True
        except asyncio.TimeoutError:
            return False
