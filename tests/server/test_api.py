"""The OpenAI-compatible routes against the fake engine: bodies, streaming, usage, logprobs, models."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.server.fake_engine import SCRIPT


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_ready_and_models(served):
    with served.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["max_model_len"] == 512


def test_chat_completion(served):
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3, "presence_penalty": 0.5,
            "frequency_penalty": 0.1, "user": "u1", "top_k": 20, "min_p": 0.05, "min_tokens": 1,
            "repetition_penalty": 1.1, "ignore_eos": True, "store": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and SCRIPT.startswith(choice["message"]["content"])
    assert choice["finish_reason"] == "length"
    req = served.engine.submitted[-1]
    text = served.engine.tokenizer.decode(req.prompt_token_ids)
    assert "Be brief." in text and "Hi" in text and text.rstrip().endswith("assistant")
    assert body["usage"] == {"prompt_tokens": len(req.prompt_token_ids), "completion_tokens": 5,
                             "total_tokens": len(req.prompt_token_ids) + 5}
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.top_k, p.min_p, p.min_tokens, p.ignore_eos) == \
        (5, 0.7, 0.9, 3, 20, 0.05, 1, True)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.1, 1.1)


def test_max_completion_tokens_wins_and_default_fills_context(served):
    with served.client() as c:
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 9, "max_completion_tokens": 3})
        assert served.engine.submitted[-1].params.max_tokens == 3
        r = c.post("/v1/completions", json={"prompt": "Hello", "stop": ["engine"]})
    req = served.engine.submitted[-1]
    assert req.params.max_tokens == 512 - len(req.prompt_token_ids)
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["choices"][0]["text"] == "Hello from the fake "


def test_chat_stream_with_usage(served):
    with served.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert all("usage" in ch and ch["usage"] is None for ch in chunks[:-1])
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks[:-1])
    assert SCRIPT.startswith(text) and len(text) > 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stream_without_usage_has_no_usage_key(served):
    with served.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs(served):
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                 "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert content[0]["logprob"] == -0.5 and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert served.engine.submitted[-1].params.logprobs == 2


def test_completion_logprobs_and_token_prompt(served):
    ids = served.engine.tokenizer("Hello there")["input_ids"]
    with served.client() as c:
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert served.engine.submitted[-1].prompt_token_ids == ids
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert lp["tokens"][0] in lp["top_logprobs"][0]


def test_completion_stream_logprobs(served):
    with served.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": "Hi", "max_tokens": 3, "stream": True, "logprobs": 0}) as r:
        events = sse_events(r)
    lps = [e["choices"][0]["logprobs"] for e in events[:-1]]
    assert sum(len(x["tokens"]) for x in lps if x) == 3


def test_bank_selected_by_name(served, tmp_path):
    (tmp_path / "b1").mkdir()
    with served.client() as c:
        served.banks.loaded["b1"] = SimpleNamespace(name="b1", kind="mola", num_experts=8)
        models = c.get("/v1/models").json()["data"]
        r = c.post("/v1/completions", json={"model": "b1", "prompt": "Hi", "max_tokens": 2})
    assert [m["id"] for m in models] == ["fake-model", "b1"]
    assert models[1]["kind"] == "mola" and models[1]["num_experts"] == 8 and models[1]["parent"] == "fake-model"
    assert r.status_code == 200 and r.json()["model"] == "b1"
    assert served.engine.submitted[-1].bank == "b1"
