"""End to end with the real engine and the default model: the official ``openai`` client against a
live server on 127.0.0.1, banks over HTTP, disconnects, 64 concurrent streams, SIGTERM draining."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server.settings import Settings
from tests.server.conftest import ServerThread, free_port, wait_until

pytestmark = pytest.mark.slow

ADMIN = "admin-secret"


def _write_bank(default_model_dir, folder) -> None:
    import torch

    from adapters.storage import save_bank
    from tests.adapters.bank_builders import fingerprint_of, random_bank

    bank = random_bank("dynmole", fingerprint_of(default_model_dir), r=4, experts_per_layer=(4,), name="demo")
    with torch.no_grad():  # small deltas: the real model keeps producing text
        for layer in bank.layers:
            for lin in layer.linears.values():
                lin.lora_b.mul_(1e-3)
    save_bank(bank, folder)


@pytest.fixture(scope="module")
def live(default_model_dir, tmp_path_factory):
    from server.api.app import create_app
    from server.commands.serve import build_engine

    root = tmp_path_factory.mktemp("banks")
    _write_bank(default_model_dir, root / "demo")
    settings = Settings(admin_key=ADMIN, bank_root=[root], max_num_seqs=64, max_model_len=1024,
                        max_num_batched_tokens=1024)
    engine, banks = build_engine(settings)
    app = create_app(settings, engine, banks)
    with ServerThread(app) as st:
        url = f"http://127.0.0.1:{st.port}"
        yield dict(url=url, app=app, engine=engine, root=root, model=app.state.model_name,
                   client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120))


def test_openai_chat(live):
    r = live["client"].chat.completions.create(
        model=live["model"], messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_streaming_chat_with_usage(live):
    stream = live["client"].chat.completions.create(
        model=live["model"], messages=[{"role": "user", "content": "Count to five."}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6


def test_openai_completions_with_logprobs(live):
    r = live["client"].completions.create(model=live["model"], prompt="The capital of France is", max_tokens=4,
                                          logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def _reference_logprobs(engine, ids):
    import torch

    from server.model import SequenceKVCache, StepContext, step_context

    model = engine.engine.model
    cache = SequenceKVCache(model.config)
    step = cache.step([0], [len(ids)])
    with torch.inference_mode(), step_context(StepContext(positions=step.positions(), attention=step,
                                                          logits_indices=torch.arange(len(ids)))):
        return torch.log_softmax(model(torch.tensor(ids)).float(), -1)


def test_echo_scores_a_prompt_as_loglikelihood_evaluation_asks(live):
    """lm-evaluation-harness's OpenAI completions loglikelihood: token ids, echo, max_tokens 0, logprobs 1."""
    ids = live["engine"].engine.tokenizer("The capital of France is Paris")["input_ids"]
    r = live["client"].completions.create(model=live["model"], prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                          temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids) and choice.finish_reason == "length"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text
    ref = _reference_logprobs(live["engine"], ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-3
        top = lp.top_logprobs[i]  # the most likely token (+ the prompt's own): what tells a greedy continuation
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-3)


def test_echo_with_generation_text_and_stream(live):
    prompt = "Once upon a time"
    r = live["client"].completions.create(model=live["model"], prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                          temperature=0)
    plain = live["client"].completions.create(model=live["model"], prompt=prompt, max_tokens=3, temperature=0)
    choice = r.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    n_prompt = r.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == n_prompt + r.usage.completion_tokens
    assert choice.logprobs.token_logprobs[0] is None and all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    offsets = choice.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    chunks = list(live["client"].completions.create(model=live["model"], prompt=prompt, max_tokens=3, echo=True,
                                                     logprobs=2, temperature=0, stream=True))
    assert chunks[0].choices[0].text == prompt and len(chunks[0].choices[0].logprobs.tokens) == n_prompt
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    scored = list(live["client"].completions.create(model=live["model"], prompt=prompt, max_tokens=0, echo=True,
                                                    stream=True))
    assert "".join(c.choices[0].text for c in scored) == prompt and scored[-1].choices[0].finish_reason == "length"


def test_openai_models_and_bank_by_name(live):
    admin = httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    r = admin.post("/v1/banks", json={"name": "demo", "path": str(live["root"] / "demo")})
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "dynmole" and r.json()["num_experts"] > 0
    models = live["client"].models.list().data
    assert models[0].id == live["model"]
    demo = next(m for m in models if m.id == "demo")
    assert demo.kind == "dynmole" and demo.num_experts > 0
    r = live["client"].chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
    assert r.model == "demo" and r.usage.completion_tokens >= 1
    metrics = admin.get("/metrics").text
    assert 'moleserve_requests_total{bank="demo"' in metrics
    # outside the allowed roots: refused, and the error names the problem
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    assert admin.delete("/v1/banks/demo").status_code == 200
    with pytest.raises(openai.NotFoundError):
        live["client"].chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def _idle(engine) -> bool:
    return engine.num_running == 0 and engine.num_waiting == 0 and engine.kv_blocks_free == engine.kv_blocks_total


def test_disconnect_mid_stream_frees_kv_blocks(live):
    engine = live["engine"]
    wait_until(lambda: _idle(engine), what="an idle engine")
    with httpx.Client(base_url=live["url"], timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 500,
                                                       "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), lines)]
            assert any(x.startswith("data: ") for x in got)
            assert engine.num_running == 1 and engine.kv_blocks_free < engine.kv_blocks_total
        # leaving the block closes the connection mid-stream
    wait_until(lambda: _idle(engine), timeout=10, what="the aborted request's blocks to be freed")
    text = httpx.get(live["url"] + "/metrics").text
    assert 'finish_reason="abort"' in text
    assert re.search(r'^vllm:num_requests_running\{[^}]*\} 0\.0$', text, flags=re.M)
    assert re.search(r'^vllm:kv_cache_usage_perc\{[^}]*\} 0\.0$', text, flags=re.M)


def test_disconnect_while_waiting_for_a_full_response_aborts(live):
    engine = live["engine"]
    wait_until(lambda: _idle(engine), what="an idle engine")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live["url"] + "/v1/completions", json={"prompt": "Once", "max_tokens": 500, "ignore_eos": True},
                   timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: _idle(engine), timeout=10, what="the aborted request's blocks to be freed")


def test_64_concurrent_streams_complete(live):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=live["model"], messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=4,
            stream=True, stream_options={"include_usage": True})
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return finish, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=live["url"] + "/v1", api_key="unused", max_retries=0, timeout=240)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == 64
    assert all(f in ("stop", "length") and 1 <= u <= 4 for f, u in results), results
    assert time.monotonic() - start < 240
    wait_until(lambda: _idle(live["engine"]), what="an idle engine")


def _serve_subprocess(env: dict, *args: str, tries: int = 3) -> tuple[subprocess.Popen, str]:
    """``moleserve serve`` in a subprocess on a free port, once it is ready: (process, url). The port
    is chosen before the server binds it, so another process may take it first; then try another."""
    for _ in range(tries):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while proc.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server did not become ready: {proc.communicate()[0]}")
            time.sleep(0.5)
        out = proc.stdout.read()
        assert "address already in use" in out.lower(), out
    raise AssertionError(f"no free port in {tries} tries")


def test_sigterm_lets_in_flight_streams_finish(default_model_dir):
    env = {**os.environ, "MOLESERVE_GRACE_PERIOD": "120", "MOLESERVE_LOG_LEVEL": "warning"}
    proc, url = _serve_subprocess(env, "--max-model-len", "512")
    try:
        started, results = threading.Barrier(9), [None] * 8

        def stream(i: int) -> None:
            events = []
            with httpx.Client(base_url=url, timeout=120) as c, c.stream(
                    "POST", "/v1/completions",
                    json={"prompt": f"Story {i}:", "max_tokens": 24, "ignore_eos": True, "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            started.wait(timeout=120)
                results[i] = (r.status_code, events)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait(timeout=120)  # every stream has its first token
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the same request twice (group kill + a forwarding parent): one drain
        time.sleep(0.3)
        try:  # new work is refused while the 8 finish
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
            assert httpx.get(url + "/ready", timeout=10).status_code == 503
        except httpx.TransportError:
            pass  # already exited: the streams below must still be complete
        for t in threads:
            t.join(timeout=120)
        for status, events in results:
            assert status == 200 and events[-1] == "[DONE]"
            finals = [json.loads(e) for e in events[:-1]]
            assert finals[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(f["choices"][0]["text"] for f in finals)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
