"""#20's API surface against the fake engine, through the official ``openai`` client where it has
the call: several prompts per completions request, structured-output fields reaching the engine,
tool calls parsed (whole and streamed), /tokenize, /detokenize, /version and vLLM's model fields."""

from __future__ import annotations

import json

import openai
import pytest

from server.engine.protocol import StructuredOutput
from tests.server.fake_engine import SCRIPT
from tests.server.test_api import sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_several_prompts_one_choice_each(served):
    ids = served.engine.tokenizer("Token ids")["input_ids"]
    r = client(served).completions.create(model="fake-model", prompt=["One", "Two words", "Three"], max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    subs = served.engine.submitted[-3:]
    assert len({s.request_id for s in subs}) == 3 and all(s.request_id.startswith(r.id) for s in subs)
    assert [served.engine.tokenizer.decode(s.prompt_token_ids) for s in subs] == ["One", "Two words", "Three"]
    assert all(SCRIPT.startswith(c.text) and c.finish_reason == "length" for c in r.choices)
    prompt_tokens = sum(len(s.prompt_token_ids) for s in subs)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 9)
    r = client(served).completions.create(model="fake-model", prompt=[ids, ids[:1]], max_tokens=2, echo=True)
    assert [s.prompt_token_ids for s in served.engine.submitted[-2:]] == [ids, ids[:1]]
    assert r.choices[0].text.startswith("Token ids") and r.choices[1].text.startswith("Token")


def test_several_prompts_echo_scoring(served):
    """lm-evaluation-harness's loglikelihood batch: echo, logprobs, max_tokens 0, several prompts."""
    r = client(served).completions.create(model="fake-model", prompt=["A b c", "D e"], max_tokens=0, echo=True,
                                          logprobs=1)
    assert [c.text for c in r.choices] == ["A b c", "D e"]
    for c, n in zip(r.choices, (3, 2)):
        assert len(c.logprobs.tokens) == n and c.logprobs.token_logprobs[0] is None
    assert r.usage.completion_tokens == 0


def test_several_prompts_stream_tagged_by_index(served):
    with served.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": ["One", "Two", "Three"], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = [e for e in events[:-2]]
    texts = {i: "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"][0]["index"] == i) for i in range(3)}
    assert all(SCRIPT.startswith(t) and t for t in texts.values())
    finals = [ch["choices"][0] for ch in chunks if ch["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1, 2]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    # and the openai client reassembles them
    texts = {}
    for ch in client(served).completions.create(model="fake-model", prompt=["a", "b"], max_tokens=3, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1]


def test_one_bad_prompt_refuses_the_request_and_runs_nothing(served):
    before = len(served.engine.submitted)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]"):
        client(served).completions.create(model="fake-model", prompt=["fine", ""], max_tokens=2)
    assert len(served.engine.submitted) == before


@pytest.mark.parametrize("extra, kind", [
    ({"response_format": {"type": "json_object"}}, "json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}}, "json"),
    ({"extra_body": {"guided_json": {"type": "array"}}}, "json"),
    ({"extra_body": {"guided_regex": "[ab]+"}}, "regex"),
    ({"extra_body": {"guided_choice": ["yes", "no"]}}, "choice"),
    ({"extra_body": {"guided_grammar": 'start: "x"+'}}, "grammar"),
])
def test_structured_output_fields_reach_the_engine(served, extra, kind):
    client(served).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, **extra)
    spec = served.engine.submitted[-1].params.structured
    assert isinstance(spec, StructuredOutput) and spec.kind == kind
    client(served).completions.create(model="fake-model", prompt="hi", max_tokens=2,
                                      extra_body={"guided_choice": ["a", "b"]})
    assert served.engine.submitted[-1].params.structured == StructuredOutput("choice", '["a", "b"]')


def _script(served, text: str) -> None:
    served.engine.script = served.engine.tokenizer(text, add_special_tokens=False)["input_ids"]


CALL_TEXT = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_parsed_from_the_output(served):
    _script(served, CALL_TEXT)
    n = len(served.engine.script)
    r = client(served).chat.completions.create(model="fake-model", tools=[WEATHER], max_tokens=n,
                                               messages=[{"role": "user", "content": "Weather in Paris?"}])
    m = r.choices[0].message
    assert m.content == "Let me look." and len(m.tool_calls) == 1
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    prompt = served.engine.tokenizer.decode(served.engine.submitted[-1].prompt_token_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt  # the template has no tools: the Qwen-style section
    assert served.engine.submitted[-1].params.structured is None  # auto: nothing constrains the output
    # streamed: content deltas without the tag, then the call as a tool_calls delta
    content, calls, finish = "", [], None
    for ch in client(served).chat.completions.create(model="fake-model", tools=[WEATHER], max_tokens=n, stream=True,
                                                     messages=[{"role": "user", "content": "Weather?"}]):
        d = ch.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    assert content == "Let me look." and [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")


def test_tool_choice_required_and_named_constrain_the_output(served):
    _script(served, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    n = len(served.engine.script)
    r = client(served).chat.completions.create(model="fake-model", tools=[WEATHER], tool_choice="required",
                                               max_tokens=n, messages=[{"role": "user", "content": "Weather?"}])
    spec = served.engine.submitted[-1].params.structured
    assert spec.kind == "json" and json.loads(spec.spec)["minItems"] == 1
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    _script(served, '{"city": "Rome"}')
    n = len(served.engine.script)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client(served).chat.completions.create(model="fake-model", tools=[WEATHER], tool_choice=named, max_tokens=n,
                                               messages=[{"role": "user", "content": "Weather?"}])
    assert json.loads(served.engine.submitted[-1].params.structured.spec) == WEATHER["function"]["parameters"]
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    args = ""
    for ch in client(served).chat.completions.create(model="fake-model", tools=[WEATHER], tool_choice=named,
                                                     max_tokens=n, stream=True,
                                                     messages=[{"role": "user", "content": "Weather?"}]):
        for tc in ch.choices[0].delta.tool_calls or []:
            args += tc.function.arguments or ""
    assert json.loads(args) == {"city": "Rome"}


def test_tool_turns_in_the_history(served):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    client(served).chat.completions.create(model="fake-model", tools=[WEATHER], max_tokens=2, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}])
    prompt = served.engine.tokenizer.decode(served.engine.submitted[-1].prompt_token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in prompt


def test_tokenize_detokenize_version_models(served):
    tok = served.engine.tokenizer
    with served.client() as c:
        r = c.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert r["tokens"] == tok("Hello world")["input_ids"] and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 512 and "".join(r["token_strs"]) == "Hello world"
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        client(served).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=1)
        assert chat["tokens"] == served.engine.submitted[-1].prompt_token_ids  # rendered as chat renders it
        bad = c.post("/detokenize", json={"tokens": [10**8]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert c.post("/tokenize", json={}).status_code == 400
        assert c.get("/version").json()["version"]
    model = client(served).models.list().data[0]
    assert model.id == "fake-model" and model.root == "fake-model" and model.max_model_len == 512
    assert model.permission[0]["object"] == "model_permission" and model.permission[0]["allow_sampling"]


def test_tokenize_needs_the_api_key(serve):
    s = serve(api_key="k")
    with s.client() as c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.get("/version").status_code == 401
    with s.client("k") as c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 200
