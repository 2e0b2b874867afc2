"""``n`` and ``best_of`` through the official ``openai`` client against the real engine (tiny model),
and the prefix cache's metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.settings import Settings
from tests.server.conftest import ServerThread

KEY = "test-key"
PROMPT = "The quick brown fox jumps over the lazy dog and keeps running through the field"


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    from server.api.app import create_app
    from server.commands.serve import build_engine

    settings = Settings(model=str(tiny_model_dir), api_key=KEY, kv_cache_memory=16 << 20, max_model_len=256)
    engine, banks = build_engine(settings)
    app = create_app(settings, engine, banks)
    with ServerThread(app) as st:
        url = f"http://127.0.0.1:{st.port}"
        yield dict(url=url, model=app.state.model_name,
                   client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120))


SAMPLE = dict(max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})


def _chat(live, **kw):
    return live["client"].chat.completions.create(model=live["model"], messages=[{"role": "user", "content": PROMPT}],
                                                  **{**SAMPLE, **kw})


def test_chat_n_choices_are_the_seeded_singles(live):
    r = _chat(live, n=3, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [_chat(live, seed=11 + j) for j in range(3)]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 18 and r.usage.total_tokens == r.usage.prompt_tokens + 18


def test_chat_stream_tags_chunks_by_index(live):
    chunks = list(_chat(live, n=2, seed=4, stream=True, stream_options={"include_usage": True}))
    text, finish = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12
    full = _chat(live, n=2, seed=4)
    assert [text[0], text[1]] == [c.message.content for c in full.choices]


def _complete(live, **kw):
    return live["client"].completions.create(model=live["model"], **{"prompt": PROMPT, **SAMPLE, **kw})


def test_completions_best_of_returns_the_most_likely_candidates(live):
    r = _complete(live, n=2, best_of=4, seed=21)
    assert [c.index for c in r.choices] == [0, 1] and all(c.logprobs is None for c in r.choices)
    assert r.usage.completion_tokens == 4 * 6  # every candidate's tokens
    candidates = [_complete(live, seed=21 + j, logprobs=0).choices[0] for j in range(4)]
    ranked = sorted(candidates, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in r.choices] == [c.text for c in ranked[:2]]


def test_completions_n_with_echo_logprobs_and_stream(live):
    r = _complete(live, n=2, seed=8, echo=True, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.text.startswith(PROMPT) and c.logprobs.token_logprobs[0] is None
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == r.usage.prompt_tokens + 6
    stream = list(_complete(live, n=2, seed=8, echo=True, logprobs=1, stream=True))
    text = {0: "", 1: ""}
    for chunk in stream:
        for ch in chunk.choices:
            text[ch.index] += ch.text
    assert [text[0], text[1]] == [c.text for c in r.choices]


def test_n_and_best_of_refusals_name_the_field(live):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(live, n=3, best_of=2)
    assert err.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as err:
        _complete(live, n=1, best_of=2, stream=True)
    assert err.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(live, n=0)
    assert err.value.body["param"] == "n"


def test_prefix_cache_metrics(live):
    def value(name):
        text = httpx.get(live["url"] + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    before = value("vllm:prefix_cache_hits_total")
    long_prompt = PROMPT * 4  # several full blocks
    for _ in range(2):
        _complete(live, prompt=long_prompt, max_tokens=2)
    assert value("vllm:prefix_cache_hits_total") - before >= 32
    assert value("vllm:prefix_cache_queries_total") >= value("vllm:prefix_cache_hits_total")
