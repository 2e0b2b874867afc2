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


class _QuietForcedExit(logging.Filter):
    """Drops uvicorn's "Exception in 'lifespan' protocol" traceback of the CancelledError that a
    forced exit causes (the lifespan is cancelled rather than shut down: expected, not an error)."""

    def __init__(self, server: "DrainingServer"):
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (self.server.force_exit and isinstance(exc, asyncio.CancelledError))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM / SIGINT drains (above) instead of closing
    at once, and the process then exits 0; a second signal exits at once. Signals within
    ``SAME_SIGNAL_S`` of the first count as that one: one stop request often arrives twice (a
    process-group kill plus a parent that forwards it, as ``timeout make serve`` or a shell's
    Ctrl-C through ``make`` do). ``app`` is the app from ``create_app`` (its ``state`` holds the
    admission and the engine)."""

    SAME_SIGNAL_S = 1.0

    def __init__(self, config: uvicorn.Config, app, grace_period: float):
        super().__init__(config)
        self.app, self.grace_period = app, grace_period
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._first_signal = 0.0

    async def serve(self, sockets=None) -> None:
        quiet, logger = _QuietForcedExit(self), logging.getLogger("uvicorn.error")
        logger.addFilter(quiet)
        try:
            await super().serve(sockets)
        finally:
            logger.removeFilter(quiet)

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        now = time.monotonic()
        if self._draining and now - self._first_signal < self.SAME_SIGNAL_S:
            return  # the same stop request, delivered twice
        if self._draining or self._loop is None:  # a second signal, or not serving yet: stop now
            if self._draining:
                log.warning("%s again: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        self._draining, self._first_signal = True, now
        log.info("%s: draining, grace period %.0f s", signal.Signals(sig).name, self.grace_period)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        admission, engine = self.app.state.admission, self.app.state.engine
        if not await admission.drain(self.grace_period):
            log.warning("grace period over: aborting %d request(s)", admission.in_flight)
            await engine.stop()  # aborts what still runs; those responses end with finish_reason "abort"
            await admission.drain(5.0)
        self.should_exit = True
