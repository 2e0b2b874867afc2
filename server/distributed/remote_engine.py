"""The engine client of a Ray Serve ingress: the surface ``server.api`` uses (``submit``, ``abort``,
``tokenizer``, ...), backed by engine replicas behind a Serve ``DeploymentHandle`` instead of an
in-process ``AsyncEngine``. Everything above it (validation, errors, streaming) is the standalone
server's code, unchanged.

Each request is one streaming call to ``EngineReplica.generate`` with ``multiplexed_model_id`` set
to its bank, so Serve routes it to a replica that holds the bank (and loads it there through the
multiplex loader when none does). A call that fails before its first event (a replica that died,
its node gone) is sent again: nothing reached the client yet, so the request simply starts on
another replica. After the first event a lost replica ends the request with a 503.

The replica that answered is named in the ``x-moleserve-replica`` response header
(``ReplicaHeaderMiddleware``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine.protocol import EngineError, EngineStopped, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-moleserve-replica"


@dataclass
class Refused:
    """An ``EngineError`` a replica raised at admission, sent back as a value (status, type,
    message survive the trip; an exception would arrive wrapped in Ray's error type)."""

    status: int
    type: str
    message: str

    @classmethod
    def of(cls, exc: EngineError) -> "Refused":
        return cls(exc.status, exc.type, str(exc))

    def error(self) -> EngineError:
        err = EngineError(self.message)
        err.status, err.type = self.status, self.type
        return err


class _Answered:
    """Per-request holder the header middleware reads; the engine client fills it."""

    __slots__ = ("replica",)

    def __init__(self) -> None:
        self.replica: str | None = None


_answered: contextvars.ContextVar[_Answered | None] = contextvars.ContextVar("moleserve_replica", default=None)


class ReplicaHeaderMiddleware:
    """Adds ``x-moleserve-replica`` to a response whose request an engine replica answered. Pure
    ASGI: streaming and disconnects pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        holder = _Answered()
        _answered.set(holder)

        async def with_header(message):
            if message["type"] == "http.response.start" and holder.replica:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), holder.replica.encode())]}
            await send(message)

        await self.app(scope, receive, with_header)


class RemoteEngine:
    """``handle``: a ``DeploymentHandle`` of ``EngineReplica``; ``catalog``: the ingress's
    ``BankCatalog``; ``retries``: how often a request that has not started is sent again."""

    def __init__(self, handle: Any, catalog: Any, *, retries: int = 8, retry_delay_s: float = 0.5):
        self.handle, self.catalog = handle, catalog
        self.retries, self.retry_delay_s = retries, retry_delay_s
        self._info: dict[str, Any] | None = None
        self._running = False
        self._calls: dict[str, Any] = {}  # request id -> the streaming call in flight

    async def start(self) -> None:
        if self._info is None:
            self._info = await self.handle.describe.remote()
        self._running = True

    async def stop(self, grace_s: float = 0.0) -> None:
        self._running = False
        for call in list(self._calls.values()):
            call.cancel()

    shutdown = stop

    @property
    def is_running(self) -> bool:
        return self._running

    def _need(self, key: str) -> Any:
        if self._info is None:
            raise EngineStopped("the engine replicas have not answered yet")
        return self._info[key]

    @property
    def tokenizer(self):
        return self._need("tokenizer")

    @property
    def model_config(self):
        return self._need("model_config")

    @property
    def max_model_len(self) -> int:
        return self._need("max_model_len")

    @property
    def multimodal_spec(self):
        """The replicas' ``MultiModalSpec`` (None: text only), so the ingress renders image prompts
        exactly as the standalone server does; the replica's engine checks them again."""
        return None if self._info is None else self._info.get("multimodal_spec")

    def set_stats_sink(self, sink: Any) -> None:
        """Engine statistics live in the replicas (each has its own metrics); the ingress's
        metrics keep only what the HTTP layer reports (rejections, bank operations)."""

    def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if not self._running:
            raise EngineStopped("the engine is not running")
        return self._stream(request)

    def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.cancel()  # the replica's generator ends and aborts the request in its engine

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        banks = self.catalog.locations(request.bank) if request.bank else {}
        options = dict(stream=True, multiplexed_model_id=request.bank or "")
        holder = _answered.get()
        for attempt in range(self.retries + 1):
            call = self.handle.options(**options).generate.remote(request, banks)
            self._calls[request.request_id] = call
            started = False
            unfinished = request.n  # each choice ends with its own finished event
            try:
                async for item in call:
                    if isinstance(item, Refused):
                        raise item.error()
                    if isinstance(item, str):  # the replica's name comes first
                        if holder is not None:
                            holder.replica = item
                        continue
                    started = True
                    yield item
                    unfinished -= item.finished
                    if unfinished <= 0:
                        return
                raise EngineError("the replica ended the request without a final event")
            except (EngineError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - a replica (or its node) went away
                if started:
                    raise EngineStopped(f"the replica serving this request was lost: {type(exc).__name__}") from None
                if attempt == self.retries:
                    raise EngineStopped(f"no engine replica could take the request: {type(exc).__name__}: {exc}") from None
                log.warning("request %s: replica call failed before it started (%s); sending it again",
                            request.request_id, type(exc).__name__)
                await asyncio.sleep(self.retry_delay_s)
            finally:
                if self._calls.get(request.request_id) is call:
                    del self._calls[request.request_id]
