"""#20: ``n`` > 1 on chat and completions and ``best_of`` on completions, over HTTP through the official
``openai`` client, against the real engine on the tiny random model: choices numbered ``i * n + j``,
streamed chunks tagged by index, usage counting each prompt once, per-choice seeds (seed + j), the
prompt computed once per request whatever ``n``, and a disconnect aborting every choice."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from server.api.app import create_app
from server.api.errors import APIError
from server.settings import Settings
from tests.server.conftest import ServerThread, wait_until


class _Tee:
    """The app's stats sink, plus a count of the prompt tokens the engine computed."""

    def __init__(self, inner):
        self.inner, self.prefill_tokens, self.lock = inner, 0, threading.Lock()

    def on_step(self, stats):
        with self.lock:
            self.prefill_tokens += stats.num_prefill_tokens
        self.inner.on_step(stats)

    def on_request_finished(self, stats):
        self.inner.on_request_finished(stats)


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    from server.engine.async_engine import AsyncEngine
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    # no prefix cache: a prompt computed again for a choice would show in the prefill count
    config = EngineConfig(model=tiny_model_dir, device="cpu", kv_cache_memory=8 << 20, max_model_len=512,
                          max_num_seqs=16, max_waiting=64, enable_prefix_caching=False)
    llm = LLMEngine(config)
    app = create_app(Settings(max_tokens_default=8, max_n=8), AsyncEngine(config, engine=llm))
    with ServerThread(app) as st:
        url = f"http://127.0.0.1:{st.port}"
        tee = _Tee(llm.stats_sink)
        llm.set_stats_sink(tee)
        yield dict(llm=llm, tee=tee, url=url, model=app.state.model_name,
                   client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120))


def _idle(llm):
    bm = llm.block_manager
    return not llm.sequences and bm.num_free_blocks == bm.num_blocks


def _prompt_len(live, text):
    return len(live["llm"].tokenizer(text)["input_ids"])


def _streamed(stream):
    texts, finish, usage, tagged = {}, {}, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            tagged += 1
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


PROMPT = "The quick brown fox jumps over"


def test_completions_n_choices_usage_and_seeds(live):
    c, model = live["client"], live["model"]
    tee = live["tee"]
    before = tee.prefill_tokens
    r = c.completions.create(model=model, prompt=PROMPT, n=3, max_tokens=6, seed=11, temperature=1.0)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    plen = _prompt_len(live, PROMPT)
    assert tee.prefill_tokens - before == plen  # the prompt ran once for the three choices
    assert r.usage.prompt_tokens == plen  # and counts once
    assert r.usage.completion_tokens == 18 and r.usage.total_tokens == plen + 18
    texts = [ch.text for ch in r.choices]
    assert len(set(texts)) == 3  # independent samples (seed + j each)
    again = c.completions.create(model=model, prompt=PROMPT, n=3, max_tokens=6, seed=11, temperature=1.0)
    assert [ch.text for ch in again.choices] == texts  # the same seed: the same choices
    # choice j is what a one-choice request seeded seed + j returns
    one = c.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=12, temperature=1.0)
    assert one.choices[0].text == texts[1]
    # streamed: the same choices, chunks tagged by index, usage summed the same way
    s_texts, finish, usage = _streamed(c.completions.create(
        model=model, prompt=PROMPT, n=3, max_tokens=6, seed=11, temperature=1.0, stream=True,
        stream_options={"include_usage": True}))
    assert [s_texts[j] for j in range(3)] == texts and finish == {0: "length", 1: "length", 2: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (plen, 18)
    wait_until(lambda: _idle(live["llm"]), what="every block freed")


def test_several_prompts_times_n(live):
    c, model = live["client"], live["model"]
    prompts = ["Once upon a time", "In a galaxy far away there"]
    r = c.completions.create(model=model, prompt=prompts, n=2, max_tokens=5, seed=3, logprobs=1)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    plens = [_prompt_len(live, p) for p in prompts]
    assert r.usage.prompt_tokens == sum(plens) and r.usage.completion_tokens == 20
    for i, p in enumerate(prompts):  # index i * n + j: prompt i's choice j, as the prompt alone would give it
        alone = c.completions.create(model=model, prompt=p, n=2, max_tokens=5, seed=3, logprobs=1)
        assert [ch.text for ch in r.choices[2 * i:2 * i + 2]] == [ch.text for ch in alone.choices]
        for ch in r.choices[2 * i:2 * i + 2]:
            assert len(ch.logprobs.tokens) == 5 and len(ch.logprobs.top_logprobs[0]) >= 1
    s_texts, _, usage = _streamed(c.completions.create(model=model, prompt=prompts, n=2, max_tokens=5, seed=3,
                                                       stream=True, stream_options={"include_usage": True}))
    assert [s_texts[k] for k in range(4)] == [ch.text for ch in r.choices]
    assert usage.prompt_tokens == sum(plens) and usage.completion_tokens == 20


def test_best_of_returns_the_most_likely_samples(live):
    c, model = live["client"], live["model"]
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, seed=5, temperature=1.0)
    samples = c.completions.create(n=4, logprobs=0, **kw).choices
    ranked = sorted(samples, key=lambda ch: sum(ch.logprobs.token_logprobs), reverse=True)
    best = c.completions.create(n=1, best_of=4, **kw)
    assert [ch.text for ch in best.choices] == [ranked[0].text]
    assert best.choices[0].logprobs is None  # not asked for: the ranking's logprobs are not returned
    assert best.usage.prompt_tokens == _prompt_len(live, PROMPT) and best.usage.completion_tokens == 6
    two = c.completions.create(n=2, best_of=4, logprobs=0, **kw)
    assert [ch.text for ch in two.choices] == [ch.text for ch in ranked[:2]]
    assert [ch.index for ch in two.choices] == [0, 1]
    same = c.completions.create(n=2, best_of=2, stream=True, **kw)  # best_of == n streams
    texts, _, _ = _streamed(same)
    assert texts == {0: samples[0].text, 1: samples[1].text}
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(n=1, best_of=3, stream=True, **kw)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(n=9, **kw)  # --max-n 8 here
    assert e.value.body["param"] == "n" and "--max-n" in e.value.body["message"]


def test_echo_and_structured_output_per_choice(live):
    c, model = live["client"], live["model"]
    r = c.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=3, echo=True, logprobs=1, seed=1)
    plen = _prompt_len(live, PROMPT)
    for ch in r.choices:
        assert ch.text.startswith(PROMPT)
        assert len(ch.logprobs.tokens) == plen + 3 and ch.logprobs.token_logprobs[0] is None
        assert all(v is not None for v in ch.logprobs.token_logprobs[1:])
    assert r.usage.prompt_tokens == plen
    scored = c.completions.create(model=model, prompt=PROMPT, n=2, max_tokens=0, echo=True, logprobs=0)
    assert [ch.text for ch in scored.choices] == [PROMPT, PROMPT] and scored.usage.completion_tokens == 0
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Yes or no?"}], n=4,
                                  max_tokens=5, seed=2, extra_body={"guided_choice": ["yes", "no"]})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.message.content in ("yes", "no") for ch in r.choices)


def test_chat_n_streaming_and_not_greedy_identical(live):
    c, model = live["client"], live["model"]
    msg = [{"role": "user", "content": "Tell me a story."}]
    r = c.chat.completions.create(model=model, messages=msg, n=3, max_tokens=6, seed=9, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in r.choices]
    assert len(set(texts)) == 3
    plen = r.usage.prompt_tokens
    one = c.chat.completions.create(model=model, messages=msg, max_tokens=6, seed=9, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    assert one.usage.prompt_tokens == plen and one.choices[0].message.content == texts[0]
    assert r.usage.completion_tokens == 18
    s_texts, finish, usage = _streamed(c.chat.completions.create(
        model=model, messages=msg, n=3, max_tokens=6, seed=9, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert [s_texts[j] for j in range(3)] == texts and set(finish) == {0, 1, 2}
    assert usage.prompt_tokens == plen and usage.completion_tokens == r.usage.completion_tokens
    greedy = c.chat.completions.create(model=model, messages=msg, n=3, max_tokens=6, temperature=0)
    assert len({ch.message.content for ch in greedy.choices}) == 1  # greedy: n identical choices (as vLLM)
    lp = c.chat.completions.create(model=model, messages=msg, n=2, max_tokens=4, logprobs=True, top_logprobs=2)
    assert all(len(ch.logprobs.content) == len(lp.choices[0].logprobs.content) for ch in lp.choices)


def test_disconnect_aborts_every_choice_and_frees_blocks(live):
    llm = live["llm"]
    body = {"model": live["model"], "prompt": PROMPT, "n": 4, "max_tokens": 100, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=live["url"], timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            seen = set()
            while len(seen) < 4:  # every choice has started
                line = next(lines)
                if line.startswith("data: {"):
                    seen |= {ch["index"] for ch in json.loads(line[6:])["choices"]}
            assert llm.sequences  # still generating
        # the connection is closed here, mid-stream
    wait_until(lambda: _idle(llm), timeout=30, what=lambda: f"blocks still held: {llm.sequences}")
    time.sleep(0.1)
    assert _idle(llm)
    # a non-streamed request whose client goes away is aborted too
    with httpx.Client(base_url=live["url"], timeout=0.5) as h:
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 480})
    wait_until(lambda: _idle(llm), timeout=30, what=lambda: f"blocks still held: {llm.sequences}")


def test_stop_strings_apply_to_every_choice(live):
    c, model = live["client"], live["model"]
    r = c.completions.create(model=model, prompt=PROMPT, n=4, max_tokens=12, seed=4, stop=[" "],
                             extra_body={"ignore_eos": True})
    assert all(" " not in ch.text for ch in r.choices)
    assert any(ch.finish_reason == "stop" for ch in r.choices)  # the random model writes spaces
    free = c.completions.create(model=model, prompt=PROMPT, n=4, max_tokens=12, seed=4,
                                extra_body={"ignore_eos": True})
    for cut, whole in zip(r.choices, free.choices):  # each choice cut at its own first space
        assert whole.text.startswith(cut.text)
        assert cut.finish_reason == ("stop" if " " in whole.text else "length")


# -- ChoiceFanOut alone ----------------------------------------------------------------------------------


def _fan(events, n):
    from server.api.serving_engine import ChoiceFanOut
    from server.engine.protocol import GenerationEvent

    aborted = []

    async def source():
        try:
            for index, finished in events:
                await asyncio.sleep(0)
                if isinstance(index, Exception):
                    raise index
                yield GenerationEvent("r", index=index, text=f"{index}", finished=finished)
        finally:
            aborted.append("closed")

    async def abort():
        aborted.append("abort")

    return ChoiceFanOut(source(), n, abort), aborted


async def _drain(choice):
    return [e.text async for e in choice]


def test_fan_out_splits_by_index_and_closes_once_all_are_closed():
    async def main():
        fan, closed = _fan([(1, False), (0, False), (1, True), (0, False), (0, True)], 2)
        texts = await asyncio.gather(*(_drain(ch) for ch in fan.choices))
        assert texts == [["0", "0", "0"], ["1", "1"]]
        await fan.choices[1].aclose()  # finished: the stream stays open for the other
        assert closed == []
        await fan.choices[0].aclose()
        assert closed == ["closed"]

    asyncio.run(main())


def test_fan_out_closing_an_unfinished_choice_ends_the_request():
    async def main():
        fan, closed = _fan([(0, False), (1, False), (0, False), (1, False)], 2)
        assert (await fan.choices[0].__anext__()).index == 0
        await fan.choices[1].aclose()  # not finished: the request's stream is closed (the engine aborts it)
        assert closed == ["closed"]
        with pytest.raises(APIError):  # the other choice learns its stream ended without a final event
            await fan.choices[0].__anext__()

    asyncio.run(main())


def test_fan_out_error_reaches_every_choice():
    async def main():
        fan, _ = _fan([(0, False), (ValueError("boom"), False)], 2)
        results = await asyncio.gather(*(_drain(ch) for ch in fan.choices), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)

    asyncio.run(main())


def test_fan_out_closing_while_another_choice_reads_aborts():
    from server.api.serving_engine import ChoiceFanOut

    async def main():
        gate, aborted = asyncio.Event(), []

        async def source():
            await gate.wait()  # the engine has nothing yet
            yield None

        async def abort():
            aborted.append(True)

        fan = ChoiceFanOut(source(), 2, abort)
        reader = asyncio.ensure_future(fan.choices[0].__anext__())
        await asyncio.sleep(0.01)  # choice 0 is inside the stream now
        await fan.choices[1].aclose()
        assert aborted == [True]  # the stream could not be closed under its reader: the request is aborted
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    asyncio.run(main())
