"""Admission and graceful shutdown: which requests may enter, and waiting for those inside.

On SIGTERM the server stops admitting (new requests get 503, /ready turns 503 so a load balancer
drains it), lets in-flight generations finish within the grace period, aborts what is left, and
then exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

log = logging.getLogger("moleserve.api")


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


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM / SIGINT drains (above) instead of closing
    at once, and the process then exits 0; a second signal exits at once. ``app`` is the app from
    ``create_app`` (its ``state`` holds the admission and the engine)."""

    def __init__(self, config: uvicorn.Config, app, grace_period: float):
        super().__init__(config)
        self.app, self.grace_period = app, grace_period
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None:  # a second signal, or not serving yet: stop now
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("%s: draining, grace period %.0f s", signal.Signals(sig).name, self.grace_period)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        admission, engine = self.app.state.admission, self.app.state.engine
        if not await admission.drain(self.grace_period):
            log.warning("grace period over: aborting %d request(s)", admission.in_flight)
            await engine.stop()  # aborts what still runs; those responses end with finish_reason "abort"
            await admission.drain(5.0)
        self.should_exit = True
