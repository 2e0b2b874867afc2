"""Images in POST /v1/chat/completions: the prompt as the release renders it, the image's span and
pixel values in the GenerationRequest, usage counting the image's positions, a 400 naming the part
for every bad image or part, bad images costing nothing to other requests in flight, and one image
request end to end through the real engine on a tiny Parrot."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from server.api.app import create_app
from server.multimodal import MultiModalSpec
from server.multimodal.image_processor import ImageProcessor
from server.multimodal.media import MediaPolicy, decode_image
from server.settings import Settings

from tests.server.conftest import ServerThread
from tests.server.fake_engine import FakeBanks, FakeEngine

CHAT = "/v1/chat/completions"
TOKENS = 10
PLACEHOLDER = 2


def png(seed: int = 0, size=(30, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts, model=None, **kw) -> dict:
    body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": list(parts)}], "max_tokens": 3, **kw}
    if model:
        body["model"] = model
    return body


PROCESSOR = ImageProcessor.from_dict({"size": {"shortest_edge": 28}, "crop_size": 28})


def spec(**kw) -> MultiModalSpec:
    return MultiModalSpec(**{"tokens_per_image": TOKENS, "max_images": 1, "placeholder_token_id": PLACEHOLDER,
                             "processor": PROCESSOR, **kw})


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def serve_mm(tokenizer, tmp_path):
    servers = []

    def start(mm_spec=spec(), engine_kw=None, **settings):
        banks = FakeBanks(tmp_path)
        engine = FakeEngine(tokenizer, banks=banks, **(engine_kw or {}))
        engine.multimodal_spec = mm_spec
        st = ServerThread(create_app(Settings(**settings), engine, banks=banks)).__enter__()
        servers.append(st)
        return SimpleNamespace(url=f"http://127.0.0.1:{st.port}", engine=engine, banks=banks)

    yield start
    for st in reversed(servers):
        st.__exit__(None, None, None)


def test_image_prompt_is_rendered_and_spanned_as_released(serve_mm, tokenizer):
    s = serve_mm()
    data = png()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask(image_part(data_url(data)), {"type": "text", "text": "What is this?"}))
    assert r.status_code == 200, r.text
    req = s.engine.submitted[-1]
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "<image>\nWhat is this?"}],
        add_generation_prompt=True, tokenize=False)
    before, after = text.split("<image>")
    want = (tokenizer(before, add_special_tokens=False)["input_ids"] + [PLACEHOLDER] * TOKENS
            + tokenizer(after, add_special_tokens=False)["input_ids"])
    assert list(req.prompt_token_ids) == want
    (image,) = req.images
    assert (image.offset, image.length) == (len(tokenizer(before, add_special_tokens=False)["input_ids"]), TOKENS)
    loaded = decode_image(data, MediaPolicy())
    assert image.content_hash == loaded.content_hash
    torch.testing.assert_close(image.pixel_values, PROCESSOR(loaded.image))
    assert r.json()["usage"]["prompt_tokens"] == len(want)  # the image's positions count


def test_image_url_as_a_plain_string_and_image_last(serve_mm, tokenizer):
    s = serve_mm()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask(QUESTION, {"type": "image_url", "image_url": data_url(png())}))
    assert r.status_code == 200, r.text
    req = s.engine.submitted[-1]
    (image,) = req.images
    assert req.prompt_token_ids[image.offset:image.offset + TOKENS] == [PLACEHOLDER] * TOKENS
    # text then image: no newline is added between them
    text = tokenizer.decode(req.prompt_token_ids[:image.offset])
    assert text.endswith("What is it?")


def test_text_only_requests_unchanged(serve_mm, tokenizer):
    s = serve_mm()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask({"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}))
    assert r.status_code == 200
    req = s.engine.submitted[-1]
    text = tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                          {"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False)
    assert list(req.prompt_token_ids) == tokenizer(text, add_special_tokens=False)["input_ids"] and not req.images


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    side = 20000
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" * (1 + side // 8)) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


QUESTION = {"type": "text", "text": "What is it?"}


@pytest.mark.parametrize("parts, words, param", [
    ([image_part("data:image/png;base64,!!!!"), QUESTION], ["not valid base64"], "messages[1].content[0]"),
    ([QUESTION, image_part(data_url(png()[:200]))], ["cannot be decoded"], "messages[1].content[1]"),
    ([image_part("data:text/plain;base64,aGk="), QUESTION], ["unsupported media type"], "messages[1].content[0]"),
    ([image_part(data_url(_bomb())), QUESTION], ["--max-image-pixels"], "messages[1].content[0]"),
    ([image_part("https://example.com/cat.png"), QUESTION], ["--allowed-media-domains"], "messages[1].content[0]"),
    ([image_part("file:///etc/passwd"), QUESTION], ["--allowed-local-media-path"], "messages[1].content[0]"),
    ([QUESTION, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
     ["'input_audio' are not supported"], "messages[1].content[1]"),
    ([image_part(data_url(png())), image_part(data_url(png(1))), QUESTION], ["at most 1"], "messages[1].content[1]"),
    ([image_part(data_url(png())), {"type": "text", "text": "is <image> here?"}], ["image marker"],
     "messages[1].content[1]"),
    ([{"type": "image_url"}], ["image_url.url"], "messages[1].content[0]"),
])
def test_bad_parts_are_400_naming_the_part(serve_mm, parts, words, param):
    s = serve_mm()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask(*parts))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for w in words:
        assert w in err["message"]
    assert not s.engine.submitted


def test_byte_limit_and_images_outside_user_messages(serve_mm):
    s = serve_mm(max_image_bytes=2048, max_request_bytes=1 << 22)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask(image_part(data_url(png(size=(200, 200)))), QUESTION))
        assert r.status_code == 400 and "--max-image-bytes" in r.json()["error"]["message"]
        body = {"messages": [{"role": "system", "content": [image_part(data_url(png()))]},
                             {"role": "user", "content": "hi"}]}
        r = c.post(CHAT, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"


def test_body_limit_makes_room_for_images(serve_mm):
    big = png(7, size=(700, 700))  # ~1.5 MB, ~2 MB as base64: over the 1 MiB default body limit
    assert len(big) > 1 << 20
    with httpx.Client(base_url=serve_mm().url, timeout=30) as c:
        assert c.post(CHAT, json=ask(image_part(data_url(big)), QUESTION)).status_code == 200
    with httpx.Client(base_url=serve_mm(mm_spec=None).url, timeout=30) as c:  # a text model keeps the default
        assert c.post(CHAT, json=ask(image_part(data_url(big)), QUESTION)).status_code == 413
    with httpx.Client(base_url=serve_mm(max_request_bytes=1 << 20).url, timeout=30) as c:  # set: it holds
        assert c.post(CHAT, json=ask(image_part(data_url(big)), QUESTION)).status_code == 413


def test_text_only_model_and_tower_only_base(serve_mm):
    with httpx.Client(base_url=serve_mm(mm_spec=None).url, timeout=30) as c:
        r = c.post(CHAT, json=ask(image_part(data_url(png())), QUESTION))
        assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages[1].content[0]"
    s = serve_mm(mm_spec=spec(needs_bank=True))
    s.banks.loaded["text-bank"] = SimpleNamespace(name="text-bank", kind="dynmole", num_experts=4, version=1)
    s.banks.loaded["vision-bank"] = SimpleNamespace(name="vision-bank", kind="parrot", num_experts=3, version=1)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(CHAT, json=ask(image_part(data_url(png())), QUESTION))
        assert r.status_code == 400 and "must name a parrot bank" in r.json()["error"]["message"]
        r = c.post(CHAT, json=ask(image_part(data_url(png())), QUESTION, model="text-bank"))
        assert r.status_code == 400 and "'text-bank' is not a parrot bank" in r.json()["error"]["message"]
        r = c.post(CHAT, json=ask(image_part(data_url(png())), QUESTION, model="vision-bank"))
        assert r.status_code == 200, r.text
        assert s.engine.submitted[-1].bank == "vision-bank" and len(s.engine.submitted[-1].images) == 1


class _Slow(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        time.sleep(2.0)
        body = png(5)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_bad_and_slow_images_cost_other_requests_nothing(serve_mm):
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    s = serve_mm(engine_kw={"step_s": 0.005}, allowed_media_domains=["127.0.0.1"], media_fetch_timeout=5)
    good = ask(image_part(data_url(png())), QUESTION, max_tokens=120, stream=True)
    bad = [ask(image_part(data_url(png()[:100 + i])), QUESTION) for i in range(8)]
    slow = ask(image_part(f"http://127.0.0.1:{http.server_address[1]}/x.png"), QUESTION)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(12) as pool:
            def stream():
                chunks = []
                with c.stream("POST", CHAT, json=good) as r:
                    assert r.status_code == 200
                    chunks.extend(line for line in r.iter_lines() if line)
                return chunks
            streaming = pool.submit(stream)
            slow_reply = pool.submit(c.post, CHAT, json=slow)
            time.sleep(0.2)
            bad_replies = [pool.submit(c.post, CHAT, json=b) for b in bad]
            t0 = time.perf_counter()
            text_reply = c.post(CHAT, json=ask(QUESTION))  # while the slow image downloads
            text_latency = time.perf_counter() - t0
            assert all(f.result().status_code == 400 for f in bad_replies)
            lines = streaming.result()
            assert slow_reply.result().status_code == 200
    finally:
        http.shutdown()
        http.server_close()
    assert text_reply.status_code == 200 and text_latency < 1.5
    assert lines[-1] == "data: [DONE]"
    finals = [line for line in lines if '"finish_reason": "length"' in line]
    assert len(finals) == 1  # the good stream ran all its 120 tokens, untouched
    assert not s.engine.aborted


# -- end to end on the real engine --------------------------------------------------------------


def test_image_chat_end_to_end_equals_the_engine_on_the_release_prompt(parrot_dir, parrot_model, tower_dir):
    """Through HTTP on a tiny released-layout Parrot: the same greedy tokens as the engine given the
    release's prompt built by hand (ChatML pieces around 10 placeholders, the release's pre-processing)."""
    from server.engine.async_engine import AsyncEngine
    from server.engine.llm_engine import load_tokenizer

    from .builders import TOKENS_PER_IMAGE, pad_and_process, random_image
    from .helpers import chat_pieces, image_request, make_engine, tokens_of

    tok = load_tokenizer(parrot_dir)
    image = random_image(3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    question = "What is in the picture?"

    reference = make_engine(parrot_dir, parrot_model, tokenizer=tok)
    before, after = chat_pieces(tok, question)
    placeholder = reference.multimodal_spec.placeholder_token_id
    pixels = pad_and_process(image, tower_dir)
    reference.add_request(image_request("ref", before, after, pixels, "h", TOKENS_PER_IMAGE, placeholder, max_tokens=5))
    want = []
    while reference.has_unfinished():
        want += tokens_of(reference.step())

    llm = make_engine(parrot_dir, parrot_model, tokenizer=tok)
    engine = AsyncEngine(llm.config, engine=llm)
    with ServerThread(create_app(Settings(), engine)) as st, httpx.Client(base_url=f"http://127.0.0.1:{st.port}",
                                                                           timeout=60) as c:
        r = c.post(CHAT, json={"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [image_part(data_url(buf.getvalue())), {"type": "text", "text": question}]}],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        got = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
        assert len(want) == 5 and got == [tok.decode([t]) for t in want]
        assert body["usage"]["prompt_tokens"] == len(before) + TOKENS_PER_IMAGE + len(after)


def test_image_chat_with_n_2_returns_two_choices(parrot_dir, parrot_model):
    """``n: 2`` with an image, through HTTP on the tiny Parrot: two choices (the prompt and its image
    counted once), choice j the one-choice request seeded seed + j, streamed the same, and greedy
    choices equal to the one-choice greedy answer."""
    from server.engine.async_engine import AsyncEngine
    from server.engine.llm_engine import load_tokenizer

    from .builders import random_image
    from .helpers import make_engine

    buf = io.BytesIO()
    random_image(5).save(buf, format="PNG")
    llm = make_engine(parrot_dir, parrot_model, tokenizer=load_tokenizer(parrot_dir))
    engine = AsyncEngine(llm.config, engine=llm)
    with ServerThread(create_app(Settings(), engine)) as st, httpx.Client(base_url=f"http://127.0.0.1:{st.port}",
                                                                           timeout=120) as c:
        def chat(**kw) -> dict:
            body = {"messages": [{"role": "user", "content": [image_part(data_url(buf.getvalue())), QUESTION]}],
                    "max_tokens": 4, "ignore_eos": True, **kw}
            r = c.post(CHAT, json=body)
            assert r.status_code == 200, r.text
            return r.json()

        two = chat(n=2, temperature=1.0, seed=7)
        assert [ch["index"] for ch in two["choices"]] == [0, 1]
        assert [ch["finish_reason"] for ch in two["choices"]] == ["length", "length"]
        texts = [ch["message"]["content"] for ch in two["choices"]]
        assert texts[0] != texts[1]  # independent samples (seed + j)
        one = chat(temperature=1.0, seed=7)
        assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt and image count once
        assert two["usage"]["completion_tokens"] == 8
        assert [chat(temperature=1.0, seed=7 + j)["choices"][0]["message"]["content"] for j in range(2)] == texts

        streamed, finish = {}, {}
        with c.stream("POST", CHAT, json={
                "messages": [{"role": "user", "content": [image_part(data_url(buf.getvalue())), QUESTION]}],
                "max_tokens": 4, "ignore_eos": True, "n": 2, "temperature": 1.0, "seed": 7, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for ch in json.loads(line[6:])["choices"]:
                        streamed[ch["index"]] = streamed.get(ch["index"], "") + (ch["delta"].get("content") or "")
                        if ch.get("finish_reason"):
                            finish[ch["index"]] = ch["finish_reason"]
        assert [streamed[j] for j in range(2)] == texts and finish == {0: "length", 1: "length"}

        greedy = chat(n=2, temperature=0)
        alone = chat(temperature=0)["choices"][0]["message"]["content"]
        assert [ch["message"]["content"] for ch in greedy["choices"]] == [alone, alone]


def test_openai_client_sends_an_image(serve_mm):
    """The official client's shape of an image message reaches the engine as one image span."""
    openai = pytest.importorskip("openai")
    s = serve_mm()
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="fake-model", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png()), "detail": "auto"}},
        {"type": "text", "text": "Describe it."}]}])
    assert reply.choices[0].finish_reason == "length"
    (image,) = s.engine.submitted[-1].images
    assert reply.usage.prompt_tokens == len(s.engine.submitted[-1].prompt_token_ids) and image.length == TOKENS
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert bad.value.body["param"] == "messages[0].content[0]"
