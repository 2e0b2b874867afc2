"""Every error path: the status and an OpenAI-style error body, never a 500 for a client's mistake."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.server.conftest import wait_until

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    assert "Traceback" not in r.text
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("body, status, words, param", [
    ({"messages": MSG, "n": 0}, 400, ["n must be in [1, 16]"], "n"),
    ({"messages": MSG, "n": 17}, 400, ["n must be in [1, 16]", "--max-n"], "n"),
    ({"messages": MSG, "temperature": -1}, 400, ["temperature"], None),
    ({"messages": MSG, "top_p": 0}, 400, ["top_p"], None),
    ({"messages": MSG, "top_k": -5}, 400, ["top_k"], None),
    ({"messages": MSG, "min_p": 2}, 400, ["min_p"], None),
    ({"messages": MSG, "presence_penalty": 3}, 400, ["presence_penalty"], None),
    ({"messages": MSG, "repetition_penalty": 0}, 400, ["repetition_penalty"], None),
    ({"messages": MSG, "max_tokens": 0}, 400, ["max_tokens"], None),
    ({"messages": MSG, "max_tokens": 4, "min_tokens": 5}, 400, ["min_tokens"], None),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, ["logprobs"], None),
    ({"messages": MSG, "top_logprobs": 2}, 400, ["top_logprobs"], "top_logprobs"),
    ({"messages": MSG, "logit_bias": {"abc": 1.0}}, 400, ["logit_bias keys must be token ids", "'abc'"], "logit_bias"),
    ({"messages": MSG, "logit_bias": {"1000000000": 1.0}}, 400, ["out of range"], "logit_bias"),
    ({"messages": MSG, "logit_bias": {"-3": 1.0}}, 400, ["out of range"], "logit_bias"),
    ({"messages": MSG, "logit_bias": {"5": "much"}}, 422, ["logit_bias"], None),
    ({"messages": MSG, "tools": [{"type": "function"}]}, 422, ["tools"], "tools.0.function"),
    ({"messages": MSG, "tools": [TOOL, TOOL]}, 400, ["unique"], "tools"),
    ({"messages": MSG, "tool_choice": "required"}, 400, ["needs tools"], "tool_choice"),
    ({"messages": MSG, "tools": [TOOL], "tool_choice": "sometimes"}, 400, ["tool_choice"], "tool_choice"),
    ({"messages": MSG, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     ["nope", "not among the tools"], "tool_choice"),
    ({"messages": MSG, "tools": [TOOL], "tool_choice": "required", "guided_regex": "a+"}, 400, ["guided_regex"],
     "tool_choice"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, 400, ["JSON schema"], "tools"),
    ({"messages": MSG, "response_format": {"type": "yaml"}}, 400, ["response_format"], "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, 400, ["json_schema.schema"], "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "bogus"}}}}}}, 400,
     ["invalid JSON schema"], "response_format"),
    ({"messages": MSG, "guided_json": "{not json"}, 400, ["not valid JSON"], "guided_json"),
    ({"messages": MSG, "guided_regex": "(a"}, 400, ["invalid regular expression"], "guided_regex"),
    ({"messages": MSG, "guided_grammar": "start: nothing_here"}, 400, ["invalid grammar"], "guided_grammar"),
    ({"messages": MSG, "guided_choice": []}, 400, ["guided_choice"], "guided_choice"),
    ({"messages": MSG, "guided_choice": ["a"], "guided_regex": "a"}, 400, ["at most one"], "guided_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     ["takes no images"], "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     ["'input_audio' are not supported"], "messages[0].content[0]"),
    ({"messages": MSG, "stop_token_ids": [10**9]}, 400, ["out of range"], "stop_token_ids"),
    ({"messages": MSG, "model": "nope"}, 404, ["nope", "does not exist"], "model"),
    ({"messages": []}, 422, ["messages"], "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, ["messages"], None),
    ({"messages": MSG, "temperature": "hot"}, 422, ["temperature"], "temperature"),
    ({}, 422, ["messages"], "messages"),
])
def test_chat_client_errors(served, body, status, words, param):
    with served.client() as c:
        assert_error(c.post(CHAT, json=body), status, *words, param=param)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, ["empty"]),
    ({"prompt": ["a", ""]}, 400, ["prompt[1] is empty"]),
    ({"prompt": []}, 400, ["empty"]),
    ({"prompt": ["a"] * 129}, 400, ["at most 128 prompts"]),
    ({"prompt": [[1, 2], [3, -1]]}, 400, ["out of range"]),
    ({"prompt": "x", "guided_json": {"type": "object", "required": 5}}, 400, ["guided_json"]),
    ({"prompt": [1, 2, -3]}, 400, ["out of range"]),
    ({"prompt": "x", "max_tokens": 0}, 400, ["max_tokens"]),  # 0 only with echo (scoring the prompt)
    ({"prompt": "x", "best_of": 2, "n": 3}, 400, ["best_of (2) must be at least n (3)"]),
    ({"prompt": "x", "best_of": 17}, 400, ["best_of must be in [1, 16]"]),
    ({"prompt": "x", "best_of": 3, "stream": True}, 400, ["best_of > n cannot be streamed"]),
    ({"prompt": "x", "logprobs": 30}, 400, ["logprobs"]),
    ({"prompt": {"a": 1}}, 422, ["prompt"]),
    ({"prompt": "x", "logit_bias": {"7.5": 1}}, 400, ["logit_bias keys must be token ids"]),
])
def test_completion_client_errors(served, body, status, words):
    with served.client() as c:
        assert_error(c.post("/v1/completions", json=body), status, *words)


def test_context_window(served):
    long_prompt = list(range(100, 700))  # 600 tokens > 512
    with served.client() as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": long_prompt}), 400, "512", "600", param="prompt")
        assert err["code"] == "context_length_exceeded"
        assert_error(c.post("/v1/completions", json={"prompt": [5] * 10, "max_tokens": 600}), 400,
                     "600", "10", "512", param="max_tokens")
        assert_error(c.post(CHAT, json={"messages": MSG, "max_completion_tokens": 10**6}), 400, "1000000", "512")


def test_bad_json_and_wrong_content(served):
    with served.client() as c:
        assert_error(c.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
        assert_error(c.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 422)
        assert_error(c.post(CHAT, content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                            headers={"content-type": "application/json"}), 422, "temperature")
        assert_error(c.post(CHAT, content=b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": NaN}}',
                            headers={"content-type": "application/json"}), 422, "logit_bias")


def test_unknown_route_and_method(served):
    with served.client() as c:
        assert_error(c.get("/v1/nothing"), 404)
        assert_error(c.get(CHAT), 405)
        assert_error(c.delete("/v1/models"), 405)


def test_body_too_large(serve):
    s = serve(max_request_bytes=4096)
    with s.client() as c:
        assert_error(c.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 5000}]}), 413, "4096")

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 1000

        assert_error(c.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
        assert c.post(CHAT, json={"messages": MSG, "max_tokens": 1}).status_code == 200


def test_queue_full_is_429_with_retry_after(serve):
    s = serve(retry_after=7, engine_kw={"max_running": 1, "max_waiting": 1, "step_s": 0.05})
    results: list[int] = []

    def one():
        with s.client() as c:
            results.append(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 40}).status_code)

    threads = [threading.Thread(target=one) for _ in range(2)]
    threads[0].start()
    wait_until(lambda: len(s.engine.running) == 1, what="a running request")
    threads[1].start()
    wait_until(lambda: len(s.engine.waiting) == 1, what=lambda: f"a waiting request: {results}")
    with s.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        metrics = c.get("/metrics").text
    err = assert_error(r, 429)
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "7"
    assert 'moleserve_rejected_requests_total{reason="overloaded"} 1.0' in metrics
    for t in threads:
        t.join(timeout=30)
    assert results == [200, 200]


def test_engine_error_mid_request_is_not_a_traceback(serve):
    s = serve()

    def broken(req):
        async def events():
            raise RuntimeError("secret internal detail")
            yield  # pragma: no cover

        return events()

    s.engine.submit = broken
    with s.client() as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 500)
        assert "secret" not in err["message"]
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
            assert r.status_code == 500


def test_unknown_bank_from_engine_is_404(serve):
    s = serve(with_banks=False)
    with s.client() as c:
        assert_error(c.post("/v1/completions", json={"model": "b1", "prompt": "x"}), 404, "b1")
