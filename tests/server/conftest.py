"""Fixtures for the HTTP tests: the default model's tokenizer, an app around the fake engine served by
uvicorn on 127.0.0.1 (a free port, in a thread), and a client for it."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.settings import Settings

from tests.server.fake_engine import FakeBanks, FakeEngine


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@dataclass
class Served:
    url: str
    app: Any
    engine: FakeEngine
    banks: FakeBanks | None
    server: uvicorn.Server

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


def bound_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (0: any free port), for ``uvicorn.Server.run(sockets=[...])``:
    the port is ours from the start, so no other process can take it between choosing and serving."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def free_port() -> int:
    """A port free just now, for a server this process cannot hand a socket to (a subprocess, Ray
    Serve's proxy): prefer ``bound_socket`` where the test runs uvicorn itself.

    Chosen below the kernel's ephemeral range: the ports the OS hands to every ``bind(0)`` and
    outgoing connection (Ray's own workers and gRPC servers open dozens while a cluster starts)
    come from that range, so one of them cannot take this port between choosing and serving; only
    another explicit bind to the same number could."""
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(200) if lo > 12000 else ():
        port = rng.randrange(10000, lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: an ephemeral port, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` from a thread (no signal handlers), for as long as the context lasts."""

    def __init__(self, app, port: int | None = None, **config):
        self.sock = bound_socket(port or 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@pytest.fixture
def serve(tokenizer, tmp_path) -> Iterator[Callable[..., Served]]:
    """``serve(**settings, engine_kw={...}, with_banks=True)`` -> a running server around a fake engine."""
    stack: list[ServerThread] = []

    def start(*, engine_kw: dict | None = None, with_banks: bool = True, **settings_kw) -> Served:
        banks = FakeBanks(tmp_path) if with_banks else None
        engine = FakeEngine(tokenizer, banks=banks, **(engine_kw or {}))
        app = create_app(Settings(**settings_kw), engine, banks=banks)
        st = ServerThread(app).__enter__()
        stack.append(st)
        return Served(f"http://127.0.0.1:{st.port}", app, engine, banks, st.server)

    yield start
    for st in reversed(stack):
        st.__exit__(None, None, None)


@pytest.fixture
def served(serve) -> Served:
    return serve()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: Any = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)
