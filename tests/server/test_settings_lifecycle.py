"""Settings (flags over environment over defaults), the serve command's user errors, and the
lifecycle against the fake engine: disconnects abort, draining refuses new work."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import httpx

from server.api.lifecycle import Admission
from server.settings import Settings, add_arguments, settings_from_args
from tests.server.conftest import wait_until
from tests.server.test_errors import assert_error


def parse(argv, monkeypatch=None, **env) -> Settings:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_defaults_env_and_flags(monkeypatch):
    s = parse([])
    assert (s.host, s.port, s.api_key, s.admin_key, s.grace_period, s.max_waiting) == ("127.0.0.1", 8000, None, None, 30.0, 256)
    s = parse(["--port", "9001", "--bank-root", "/a", "--bank-root", "/b", "--metrics-auth"], monkeypatch,
              MOLESERVE_PORT="7000", MOLESERVE_API_KEY="k", MOLESERVE_GRACE_PERIOD="5", MOLESERVE_ADMIN_KEY="")
    assert s.port == 9001 and s.grace_period == 5.0 and s.metrics_auth
    assert Settings.secret(s.api_key) == "k" and s.admin_key is None  # empty means unset
    assert [str(p) for p in s.bank_root] == ["/a", "/b"]
    monkeypatch.setenv("MOLESERVE_BANK_ROOT", "/x,/y")
    assert [str(p) for p in parse([]).bank_root] == ["/x", "/y"]


def test_serve_bad_flag_is_one_line_and_exit_2():
    main = "import sys; from server.cli import main; sys.exit(main())"  # what the console script runs
    r = subprocess.run([sys.executable, "-c", main, "serve", "--port", "99999"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("moleserve serve: error: --port") and "Traceback" not in r.stderr


def test_admission_drain():
    async def main():
        a = Admission()
        a.enter()
        assert not await a.drain(0.05) and a.draining
        asyncio.get_running_loop().call_later(0.05, a.leave)
        assert await a.drain(2)

    asyncio.run(main())


def test_a_stop_signal_delivered_twice_drains_once_and_a_later_one_forces_exit(monkeypatch):
    import logging
    import signal
    import types

    import uvicorn

    from server.api import lifecycle

    server = lifecycle.DrainingServer(uvicorn.Config(app=None), app=None, grace_period=30)
    drains = []
    server._loop = types.SimpleNamespace(call_soon_threadsafe=lambda fn: drains.append(fn))
    clock = [100.0]
    monkeypatch.setattr(lifecycle.time, "monotonic", lambda: clock[0])
    server.handle_exit(signal.SIGTERM, None)
    clock[0] += 0.2  # the group kill and make's forwarded copy: one request
    server.handle_exit(signal.SIGTERM, None)
    assert len(drains) == 1 and not server.force_exit and not server.should_exit
    clock[0] += 5  # a deliberate second signal: exit now, without the lifespan's cancellation traceback
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit and server.should_exit and len(drains) == 1
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError:
        import sys as _sys
        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in 'lifespan' protocol",
                                   None, _sys.exc_info())
    quiet = lifecycle._QuietForcedExit(server)  # serve() installs it on uvicorn's error logger
    assert not quiet.filter(record)
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "something else", None, None)
    assert quiet.filter(other)


def test_disconnect_mid_stream_aborts_and_frees_blocks(serve):
    s = serve(engine_kw={"step_s": 0.01})
    with httpx.Client(base_url=s.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert len(s.engine.running) == 1 and s.engine.kv_blocks_used > 0
    wait_until(lambda: len(s.engine.running) == 0 and len(s.engine.aborted) == 1, timeout=5, what="the abort")
    assert s.engine.kv_blocks_used == 0


def test_disconnect_before_the_full_response_aborts(serve):
    s = serve(engine_kw={"step_s": 0.01})
    try:
        httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 400}, timeout=httpx.Timeout(30, read=0.5))
    except httpx.ReadTimeout:
        pass
    wait_until(lambda: len(s.engine.aborted) == 1 and not s.engine.running, timeout=5, what="the abort")


def test_disconnect_while_queued_aborts(serve):
    s = serve(engine_kw={"step_s": 0.01, "max_running": 1})
    with httpx.Client(base_url=s.url, timeout=30) as c, c.stream(
            "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True}) as r:
        next(r.iter_lines())
        try:  # waits behind the first: no headers yet when the client gives up
            httpx.post(s.url + "/v1/completions", json={"prompt": "y", "max_tokens": 5}, timeout=httpx.Timeout(30, read=0.3))
        except httpx.ReadTimeout:
            pass
        wait_until(lambda: len(s.engine.aborted) == 1 and not s.engine.waiting, timeout=5, what="the queued abort")


def test_draining_refuses_new_work_but_not_probes(serve):
    s = serve(retry_after=3)
    s.app.state.admission.draining = True
    with s.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x"})
        err = assert_error(r, 503, "shutting down")
        assert err["type"] == "service_unavailable" and r.headers["retry-after"] == "3"
        assert c.get("/health").status_code == 200
        assert_error(c.get("/ready"), 503)
        assert 'moleserve_rejected_requests_total{reason="shutting_down"} 1.0' in c.get("/metrics").text
