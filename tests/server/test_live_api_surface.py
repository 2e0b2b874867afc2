"""#20 end to end on the default model through the official ``openai`` client: structured outputs
always parse and match their schema (greedy and sampled), tool_choice required / named give valid
calls, and loglikelihood requests batched in one completions request score exactly as one by one."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from server.settings import Settings
from tests.server.conftest import ServerThread

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
    "required": ["name", "age", "email"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "enum": ["A1", "B2", "C3"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}},
    "express": {"type": "boolean"}, "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 12}]}},
    "required": ["items", "express", "note"], "additionalProperties": False}
SENTIMENT = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                              "score": {"type": "number", "minimum": 0, "maximum": 1}},
             "required": ["label", "score"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def live(default_model_dir):
    from server.api.app import create_app
    from server.commands.serve import build_engine

    settings = Settings(max_num_seqs=32, max_model_len=1024, max_num_batched_tokens=1024)
    engine, banks = build_engine(settings)
    app = create_app(settings, engine, banks)
    with ServerThread(app) as st:
        url = f"http://127.0.0.1:{st.port}"
        yield dict(engine=engine, model=app.state.model_name,
                   client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300))


@pytest.mark.parametrize("schema, prompt", [
    (PERSON, "Make up a person with a name, an age and an email address. Answer in JSON."),
    (ORDER, "Write a small shop order as JSON."),
    (SENTIMENT, "Classify the sentiment of: 'I loved this film!'. Answer in JSON."),
])
def test_json_schema_outputs_parse_and_match(live, schema, prompt):
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        r = live["client"].chat.completions.create(
            model=live["model"], messages=[{"role": "user", "content": prompt}], max_tokens=200,
            temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": schema}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_regex_choice_grammar(live):
    c, model = live["client"], live["model"]
    msg = [{"role": "user", "content": "Describe a cat in JSON."}]
    r = c.chat.completions.create(model=model, messages=msg, max_tokens=60, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # "any object" has unbounded strings: the model may run out of tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert r.choices[0].finish_reason == "length" and text.startswith("{")
    r = c.completions.create(model=model, prompt="A date: ", max_tokens=20,
                             extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r.choices[0].text)
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is fire cold?"}], max_tokens=10,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = c.completions.create(model=model, prompt="2 + 3 = ", max_tokens=30, extra_body={
        "guided_grammar": 'root ::= num " " op " " num\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-"'})  # GBNF
    assert re.fullmatch(r"[1-9][0-9]? [+-] [1-9][0-9]?", r.choices[0].text)


def test_tool_choice_required_and_named(live):
    c, model = live["client"], live["model"]
    msg = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=model, messages=msg, tools=[WEATHER, TIME], tool_choice="required",
                                  max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    r = c.chat.completions.create(model=model, messages=msg, tools=[WEATHER, TIME], max_tokens=100,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    args = ""
    for ch in c.chat.completions.create(model=model, messages=msg, tools=[WEATHER], max_tokens=100, stream=True,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for tc in ch.choices[0].delta.tool_calls or []:
            args += tc.function.arguments or ""
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_batched_loglikelihood_equals_one_by_one(live):
    """What lm-evaluation-harness's local-completions sends with --batch_size 8 (several prompts, echo,
    logprobs, max_tokens 0) scores as its --batch_size 1 requests do."""
    c, model = live["client"], live["model"]
    context = ["Question: Where do fish live? Answer:", "The capital of France is", "To boil water, you",
               "2 + 2 =", "The sky is", "Cats like to", "A hammer is used to", "In winter it is"]
    endings = [" in water", " Paris", " heat it", " 4", " blue", " sleep", " hit nails", " cold"]
    prompts = [ctx + end for ctx in context for end in endings[:2]] + [context[i] + endings[i] for i in range(8)]
    batched = c.completions.create(model=model, prompt=prompts[:8], max_tokens=0, echo=True, logprobs=1,
                                   temperature=0.0)
    batched2 = c.completions.create(model=model, prompt=prompts[8:24], max_tokens=0, echo=True, logprobs=1,
                                    temperature=0.0)
    choices = batched.choices + batched2.choices
    assert [ch.index for ch in batched2.choices] == list(range(16))
    for prompt, ch in zip(prompts, choices):
        one = c.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                   temperature=0.0).choices[0]
        assert ch.text == one.text == prompt
        assert ch.logprobs.tokens == one.logprobs.tokens
        assert ch.logprobs.token_logprobs[0] is None and one.logprobs.token_logprobs[0] is None
        assert ch.logprobs.token_logprobs[1:] == pytest.approx(one.logprobs.token_logprobs[1:], abs=1e-4)
        # lm-eval's is_greedy: the echoed token is its top alternative
        assert [max(t, key=t.get) if t else None for t in ch.logprobs.top_logprobs] == \
            [max(t, key=t.get) if t else None for t in one.logprobs.top_logprobs]


def test_n_choices_each_match_the_schema_and_tools(live):
    """n > 1: every choice is constrained by its own grammar matcher, and tool calls parse per choice.
    The schema's language is finite (a label, no number: sampled at temperature 1 a number's digits
    need not end within any budget), so every choice must stop."""
    c, model = live["client"], live["model"]
    label_only = {"type": "object", "properties": {"label": SENTIMENT["properties"]["label"]}, "required": ["label"],
                  "additionalProperties": False}
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Classify the sentiment of: 'meh'. Answer in JSON."}],
        max_tokens=60, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": label_only}})
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), label_only)
    msg = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=model, messages=msg, tools=[WEATHER], tool_choice="required", max_tokens=120,
                                  n=2, temperature=1.0, seed=5)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_logit_bias_bans_and_forces_tokens(live):
    """OpenAI's logit_bias through the openai client: +100 forces a token (greedy and sampled, chat and
    completions, streamed or not), -100 bans the greedy choice; logprobs stay the model's own."""
    client, model, tok = live["client"], live["model"], live["engine"].tokenizer
    prompt = "The capital of France is"
    banana = tok.encode(" banana", add_special_tokens=False)[0]
    forced = tok.decode([banana] * 3)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                    logit_bias={str(banana): 100})
    assert out.choices[0].text == forced
    assert all(lp < -1.0 for lp in out.choices[0].logprobs.token_logprobs)  # raw: the model finds it unlikely
    sampled = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=1.0, seed=3,
                                        logit_bias={str(banana): 100})
    assert sampled.choices[0].text == forced
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=3, temperature=0, logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == forced.strip() or chat.choices[0].message.content == forced
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, stream=True,
                                       logit_bias={str(banana): 100})
    assert "".join(c.choices[0].text for c in stream if c.choices) == forced

    first = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    first_ids = tok.encode(first, add_special_tokens=False)
    banned = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(first_ids[0]): -100}).choices[0].text
    assert banned and banned != first
    again = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    assert again == first  # the bias was that request's alone
