"""uvicorn's h11 protocol with what a server facing slow or broken clients needs.

- A header deadline: a connection that has not sent a complete request head within
  ``header_timeout`` seconds (after connecting, or after its previous response) is closed, so
  slow-header (slowloris) clients cannot hold sockets and file descriptors. uvicorn's keep-alive
  timeout only covers a connection that sent nothing at all.
- A request head h11 refuses (a malformed ``Content-Length``, a bad request line) is answered with
  the OpenAI-style JSON error body instead of uvicorn's plain text.

The body deadline and the connection limit are the limits middleware's and uvicorn's
(``limit_concurrency``); ``serve_app`` wires all of them from the settings.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set per server by ``protocol_with``

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %gs", self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still (or again) waiting for a request head
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head has the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        payload = json.dumps(error_body(400, f"invalid HTTP request: {msg}")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(payload)).encode())]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=payload),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # the connection is past answering: just close it
            pass
        self.transport.close()


def protocol_with(header_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class for one server (uvicorn instantiates it per connection, without arguments)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
