"""Hostile clients against the HTTP layer (issue #19): lone surrogates, auth before the body, slow and
malformed requests, oversized chats, server-side max_tokens caps, the tokenizer pool, the schema."""

from __future__ import annotations

import json
import socket
import time

import pytest

from server.api.http_protocol import GuardedH11Protocol, protocol_with
from server.api.tokenizer_pool import TokenizerPool
from tests.server.conftest import ServerThread
from tests.server.test_errors import CHAT, MSG, assert_error


def _json(body) -> dict:
    """``body`` as JSON bytes with its lone surrogates escaped (as a client's JSON encoder sends them)."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def test_lone_surrogates_are_400_naming_the_field(served):
    with served.client() as c:
        assert_error(c.post(CHAT, **_json({"messages": [{"role": "user", "content": "a\ud800b"}]})), 400, "surrogate",
                     param="messages.0.content")
        assert_error(c.post("/v1/completions", **_json({"prompt": "\udfff"})), 400, "surrogate", param="prompt")
        assert_error(c.post(CHAT, **_json({"messages": MSG, "model": "\ud800"})), 400, param="model")
        assert_error(c.post(CHAT, **_json({"messages": MSG, "stop": ["x", "\ud800"]})), 400, param="stop.1")
        assert c.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200  # the server still answers


def test_auth_comes_before_the_body(serve):
    s = serve(api_key="user", admin_key="admin")
    bad = b'{"messages": [oops'
    with s.client() as c:
        for path in (CHAT, "/v1/completions", "/v1/banks", "/v1/load_lora_adapter"):
            r = c.post(path, content=bad, headers={"Content-Type": "application/json"})
            assert_error(r, 401, "key")
            assert r.headers["www-authenticate"] == "Bearer"
    with s.client("user") as c:  # the API key is no admin key: still 401 before the body
        assert_error(c.post("/v1/banks", content=bad, headers={"Content-Type": "application/json"}), 401, "admin key")
        assert_error(c.post(CHAT, content=bad, headers={"Content-Type": "application/json"}), 400, "not valid JSON")


def test_max_tokens_default_and_limit(serve):
    s = serve(max_tokens_default=3, max_tokens_limit=5)
    with s.client() as c:
        err = assert_error(c.post(CHAT, json={"messages": MSG, "max_tokens": 6}), 400, "--max-tokens-limit",
                           param="max_tokens")
        assert "5" in err["message"]
        assert c.post(CHAT, json={"messages": MSG}).status_code == 200
        assert c.post(CHAT, json={"messages": MSG, "max_tokens": 5}).status_code == 200
    assert [r.params.max_tokens for r in s.engine.submitted] == [3, 5]


def test_engine_validation_errors_carry_param(serve):
    s = serve(engine_kw={"max_model_len": 64})
    with s.client() as c:  # the FakeEngine raises like the real one: InvalidRequest with param
        err = assert_error(c.post(CHAT, json={"messages": MSG, "logprobs": True, "top_logprobs": 21}), 400,
                           "top_logprobs", param="top_logprobs")
        assert "logprobs must" not in err["message"].replace("top_logprobs", "")
        assert_error(c.post(CHAT, json={"messages": MSG, "min_tokens": 10, "max_tokens": 3}), 400, param="min_tokens")


def test_cheap_chat_checks_before_the_template(serve):
    s = serve(max_messages=4, engine_kw={"max_model_len": 64})
    with s.client() as c:
        many = [{"role": "user", "content": "x"}] * 5
        assert_error(c.post(CHAT, json={"messages": many}), 400, "--max-messages", param="messages")
        per_token = s.app.state.tokenizers.max_chars_per_token
        huge = [{"role": "user", "content": "a" * (64 * per_token + 1)}]
        err = assert_error(c.post(CHAT, json={"messages": huge}), 400, "characters", param="messages")
        assert err["code"] == "context_length_exceeded"


def test_tokenizer_pool_runs_workers_apart_with_their_own_copies(tokenizer):
    import asyncio

    pool = TokenizerPool(tokenizer, workers=2)
    seen, order = set(), []

    def work(tag: str, pause: float):
        seen.add(id(pool.current()))
        time.sleep(pause)
        order.append(tag)
        return pool.current()("hello")["input_ids"]

    async def both():
        return await asyncio.gather(pool.run(work, "slow", 0.5), pool.run(work, "fast", 0.0))

    slow, fast = asyncio.run(both())
    pool.shutdown()
    assert order == ["fast", "slow"] and slow == fast  # the short job did not queue behind the long one
    assert len(seen) == 2 and id(tokenizer) not in seen  # one copy per worker, never the shared original


@pytest.fixture
def raw_server(served):
    """The served app behind the guarded protocol with short deadlines: (host, port)."""
    from server.api.app import create_app
    from server.settings import Settings

    app = create_app(Settings(body_timeout=0.5), served.engine, banks=None)
    with ServerThread(app, lifespan="off", http=protocol_with(0.5)) as st:
        yield "127.0.0.1", st.port


def _exchange(addr, data: bytes, wait: float = 3.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes (or ``wait`` passes): (what came back, seconds)."""
    with socket.create_connection(addr, timeout=wait) as sock:
        t0 = time.monotonic()
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out, time.monotonic() - t0


def test_slow_and_malformed_requests(raw_server):
    head, took = _exchange(raw_server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    assert head == b"" and took < 2.5  # closed at the header deadline, not held open
    out, took = _exchange(raw_server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 100\r\n\r\n{\"prompt\"")
    assert out.startswith(b"HTTP/1.1 408") and b'"error"' in out and took < 2.5
    out, _ = _exchange(raw_server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"application/json" in out and b'"invalid_request_error"' in out


def test_serve_wires_the_connection_limits(monkeypatch):
    import server.commands.serve as serve_cmd
    from server.settings import Settings

    captured = {}
    monkeypatch.setattr("server.api.lifecycle.DrainingServer.run", lambda self: captured.setdefault("config", self.config))
    serve_cmd.serve_app(object(), Settings(header_timeout=3, keep_alive_timeout=4, max_connections=7))
    config = captured["config"]
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 4
    assert issubclass(config.http, GuardedH11Protocol) and config.http.header_timeout == 3


def test_openapi_says_what_the_server_does(served):
    with served.client() as c:
        schema = c.get("/openapi.json").json()
        r = c.delete("/v1/models")
        assert_error(r, 405)
        assert r.headers["allow"] == "GET"
    ops = schema["paths"]
    assert "Allow" in ops["/v1/models"]["get"]["responses"]["405"]["headers"]
    events = ops["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in events["oneOf"]
    assert "ChatCompletionChunk" in schema["components"]["schemas"]
