"""Images in the engine: one continuous batch with text and bank requests, the encoder cache, the
mixture per request, preemption, routing modes and metrics, and the engine-side refusals."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest
import torch

from adapters.bank import BaseFingerprint
from adapters.parrot import ParrotConfig, VisualAdapter
from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankHandle
from server.engine.protocol import GenerationRequest, InvalidRequest, SamplingParams
from server.engine.sequence import Sequence
from server.multimodal import ImageInput
from tests.adapters.bank_builders import random_bank
from tests.stats_sink import RecordingSink

from .builders import TOKENS_PER_IMAGE, pad_and_process, random_image
from .helpers import chat_pieces, image_request, make_engine, tokens_of

N = TOKENS_PER_IMAGE


@dataclass(eq=False)
class ParrotHandle:
    name: str
    version: int
    visual_adapter: VisualAdapter


class WithParrotBanks:
    """The bank registry (LoRA-expert banks) plus parrot banks whose handles carry a ``visual_adapter``:
    the contract the engine reads from ``AdapterProvider.acquire`` (parrot-train's registry meets it)."""

    def __init__(self, registry: BankRegistry | None, parrot: dict[str, VisualAdapter]):
        self.registry, self.parrot = registry, parrot

    def acquire(self, bank):
        if bank in self.parrot:
            return ParrotHandle(bank, 1, self.parrot[bank])
        return self.registry.acquire(bank)

    def release(self, handle):
        if isinstance(handle, BankHandle):
            self.registry.release(handle)

    def build_step(self, handles, num_tokens):
        if self.registry is None:
            return None
        return self.registry.build_step([h if isinstance(h, BankHandle) else None for h in handles], num_tokens)


def parrot_bank_adapter(vision, seed: int, experts: int = 2) -> VisualAdapter:
    cfg = ParrotConfig(hidden_size=vision.config.hidden_size, mm_hidden_size=vision.tower.hidden_size,
                       num_experts=experts, moe_intermediate_size=24, moe_weight=0.5, use_moe=True)
    torch.manual_seed(seed)
    adapter = VisualAdapter(cfg)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    return adapter.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images(tower_dir):
    return {k: pad_and_process(random_image(k), tower_dir) for k in (1, 2)}


def _lora_registry(engine):
    registry = BankRegistry(engine.model_config)
    bank = random_bank("dynmole", BaseFingerprint.from_hf_config(engine.model_config.raw), seed=5, name="dynmole")
    for layer in bank.layers:
        for ex in layer.linears.values():
            ex.lora_b.mul_(0.05)
    registry.add(bank)
    return registry


def test_text_image_and_bank_requests_share_one_batch(parrot_dir, parrot_model, parrot_tokenizer, images):
    engine = make_engine(parrot_dir, parrot_model, parrot_tokenizer)
    _, vision = parrot_model
    engine.set_adapter_provider(WithParrotBanks(_lora_registry(engine), {"pb": parrot_bank_adapter(vision, 7)}))
    tok = engine.tokenizer
    ph = engine.multimodal_spec.placeholder_token_id
    a, b = chat_pieces(tok, "What is in the picture?"), chat_pieces(tok, "Describe the colours, please.")
    text = tok("Tell me a story about a cat", add_special_tokens=False)["input_ids"]
    params = dict(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    requests = [
        GenerationRequest("text", list(text), SamplingParams(**params)),
        GenerationRequest("text-lora", list(text), SamplingParams(**params), bank="dynmole"),
        image_request("img-a", *a, images[1], "h1", N, ph, **params),
        image_request("img-b", *b, images[1], "h1", N, ph, **params),  # same image, other text
        image_request("img-2", *a, images[2], "h2", N, ph, **params),
        image_request("img-parrot-bank", *a, images[1], "h1", N, ph, bank="pb", **params),
        image_request("img-lora", *a, images[1], "h1", N, ph, bank="dynmole", **params),
    ]
    seen = []
    features = engine.visual.tower.features
    engine.visual.tower.features = lambda pv: (seen.append(pv.shape[0]), features(pv))[1]
    engine.visual.cache.clear()
    together = engine.generate(requests)
    assert seen == [2]  # one tower batch for the step's two distinct images, across 5 image requests
    for r in requests:
        alone_id = r.request_id + "-alone"
        alone = engine.generate([GenerationRequest(alone_id, r.prompt_token_ids, r.params, bank=r.bank,
                                                   images=r.images)])[alone_id]
        assert tokens_of(together[r.request_id]) == tokens_of(alone), r.request_id
        for x, y in zip(together[r.request_id], alone):
            for p, q in zip(x.logprobs, y.logprobs):
                assert abs(p.logprob - q.logprob) < 1e-4
    assert seen == [2]  # alone: tower + projector outputs came from the encoder cache
    outs = {r.request_id: tuple(tokens_of(together[r.request_id])) for r in requests}
    assert len({outs["img-a"], outs["img-parrot-bank"], outs["img-2"], outs["text"]}) == 4


def test_mixture_is_per_request_text_and_the_encoder_runs_once(parrot_dir, parrot_model, parrot_tokenizer, images):
    engine = make_engine(parrot_dir, parrot_model, parrot_tokenizer)
    tok, ph = engine.tokenizer, engine.multimodal_spec.placeholder_token_id
    a, b = chat_pieces(tok, "What is in the picture?"), chat_pieces(tok, "Describe the colours, please.")
    reqs = [image_request("a", *a, images[1], "h1", N, ph), image_request("b", *b, images[1], "h1", N, ph),
            image_request("a2", *a, images[1], "h1", N, ph)]
    seqs = []
    for r in reqs:
        state, spans = engine.check_images(r, None)
        seqs.append(Sequence(r, images=state, mm_spans=spans))
    calls = []
    project = engine.vision.adapter.project
    engine.vision.adapter.project = lambda f: (calls.append(f.shape[0]), project(f))[1]
    engine.visual.cache.clear()
    try:
        rows, embeds = engine.visual.step_inputs(seqs, [len(s) for s in seqs])
    finally:
        del engine.vision.adapter.project
    assert calls == [1]  # tower + projector once for the one image of three requests
    assert embeds.shape == (3 * N, engine.model_config.hidden_size)
    starts = [0, len(seqs[0]), len(seqs[0]) + len(seqs[1])]
    assert rows.tolist() == [s + r.images[0].offset + j for s, r in zip(starts, reqs) for j in range(N)]
    ea, eb, ea2 = embeds.split(N)
    assert not torch.allclose(ea, eb, atol=1e-4)  # the mixture reads each prompt's text
    assert torch.allclose(ea, ea2)
    # the prefix cache's key: equal exactly when image, text, adapter and routing are
    keys = [s.mm_spans[0].cache_key for s in seqs]
    assert keys[0] == keys[2] != keys[1]
    assert (seqs[0].mm_spans[0].offset, seqs[0].mm_spans[0].length) == (reqs[0].images[0].offset, N)


def test_preemption_recomputes_image_prompts_exactly(parrot_dir, parrot_model, parrot_tokenizer, images):
    roomy = make_engine(parrot_dir, parrot_model, parrot_tokenizer)
    tight = make_engine(parrot_dir, parrot_model, parrot_tokenizer, kv_cache_memory=7 * 8192, max_num_batched_tokens=64)
    assert tight.block_manager.num_blocks == 7
    tok, ph = roomy.tokenizer, roomy.multimodal_spec.placeholder_token_id
    qs = ["What is in the picture?", "Describe the colours.", "Is it a cat?", "Count the objects."]

    def reqs():
        return [image_request(f"r{i}", *chat_pieces(tok, q), images[1 + i % 2], f"h{1 + i % 2}", N, ph, max_tokens=20)
                for i, q in enumerate(qs)]

    sink = RecordingSink()
    tight.set_stats_sink(sink)
    expect = roomy.generate(reqs())
    got = tight.generate(reqs())
    assert sink.preempted > 0
    for rid, events in expect.items():
        assert tokens_of(got[rid]) == tokens_of(events), rid


@pytest.mark.parametrize("routing, computed", [("dense", 3), ("topk:1", 1)])
def test_only_the_chosen_experts_run_and_routes_reach_metrics(parrot_dir, parrot_model, parrot_tokenizer, images,
                                                             routing, computed):
    from server.metrics import ServerMetrics

    engine = make_engine(parrot_dir, parrot_model, parrot_tokenizer, visual_routing=routing)
    metrics = ServerMetrics("tiny-parrot")
    engine.set_stats_sink(metrics)
    ran = []
    hooks = [e.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, e in enumerate(engine.vision.adapter.moe_model.experts)]
    try:
        tok, ph = engine.tokenizer, engine.multimodal_spec.placeholder_token_id
        engine.generate([image_request("r", *chat_pieces(tok, "What is it?"), images[1], "h1", N, ph)])
    finally:
        for h in hooks:
            h.remove()
    assert len(ran) == computed
    text = metrics.render().decode()
    sel = [line for line in text.splitlines() if line.startswith("moleserve_expert_selections_total{")
           and 'bank="tiny-parrot"' in line and 'layer="visual"' in line and 'target="moe"' in line]
    assert sorted(int(re.search(r'expert="(\d+)"', line).group(1)) for line in sel) == sorted(ran)
    assert all(line.endswith(" 1.0") for line in sel)
    assert f'moleserve_experts_per_token_sum{{bank="tiny-parrot"}} {float(computed)}' in text
    assert 'moleserve_routing_decisions_total{bank="tiny-parrot"} 1.0' in text
    assert f'moleserve_routed_tokens_total{{bank="tiny-parrot"}} {float(N)}' in text
    assert 'moleserve_routing_entropy_count{bank="tiny-parrot"} 1.0' in text


def test_image_requests_that_cannot_run_are_refused_without_harm(parrot_dir, parrot_model, parrot_tokenizer, images):
    engine = make_engine(parrot_dir, parrot_model, parrot_tokenizer)
    tok, ph = engine.tokenizer, engine.multimodal_spec.placeholder_token_id
    before, after = chat_pieces(tok, "What is in the picture?")
    good = image_request("good", before, after, images[1], "h1", N, ph, max_tokens=8)
    expect = tokens_of(engine.generate([good])["good"])
    engine.add_request(image_request("running", before, after, images[1], "h1", N, ph, max_tokens=8))
    events = engine.step()

    def refused(match, **kw):
        req = image_request("bad", before, after, images[1], "h1", N, ph)
        req = GenerationRequest("bad", kw.get("prompt", req.prompt_token_ids), req.params,
                                images=kw.get("images", req.images))
        with pytest.raises(InvalidRequest, match=match):
            engine.add_request(req)

    img = images[1]
    two = [ImageInput(img, "h1", 0, N), ImageInput(img, "h1", N, N)]
    refused("2 images; this model takes at most 1", prompt=[ph] * (2 * N) + after, images=two)
    refused(f"its span has 4 positions; this model's images take {N}", images=[ImageInput(img, "h1", 2, 4)])
    refused(r"pixel_values must be a float tensor \[3, 42, 42\]", images=[ImageInput(img[:, :20], "h1", 2, N)])
    refused("outside the prompt", images=[ImageInput(img, "h1", len(before) + len(after) + N - 3, N)])
    refused("NaN", images=[ImageInput(torch.full_like(img, float("nan")), "h1", 2, N)])
    while engine.has_unfinished():
        events += engine.step()
    assert tokens_of([e for e in events if e.request_id == "running"]) == expect
    assert "bad" not in engine.sequences


def test_an_image_on_a_text_only_model_is_refused(make_engine_text, images):
    engine = make_engine_text()
    assert engine.multimodal_spec is None
    req = GenerationRequest("r", [5] * (N + 4), SamplingParams(max_tokens=2), images=[ImageInput(images[1], "h", 2, N)])
    with pytest.raises(InvalidRequest, match="this model takes no images"):
        engine.add_request(req)


@pytest.fixture
def make_engine_text(tiny_model_dir):
    from server.model.parrot import load_model_with_vision

    loaded = load_model_with_vision(tiny_model_dir)
    return lambda: make_engine(tiny_model_dir, loaded)


def test_tower_only_base_needs_a_parrot_bank(tiny_model_dir, tower_only_model, images):
    engine = make_engine(tiny_model_dir, tower_only_model)
    spec = engine.multimodal_spec
    assert spec.needs_bank and spec.tokens_per_image == N and spec.max_images == 1
    _, vision = tower_only_model
    wrong = ParrotConfig(hidden_size=vision.config.hidden_size, mm_hidden_size=16)
    engine.set_adapter_provider(WithParrotBanks(_lora_registry(engine), {
        "pb": parrot_bank_adapter(vision, 3), "wrong": VisualAdapter(wrong)}))
    before, after = chat_pieces(engine.tokenizer, "What is in the picture?")
    ph = spec.placeholder_token_id
    with pytest.raises(InvalidRequest, match="must name a parrot bank"):
        engine.add_request(image_request("none", before, after, images[1], "h1", N, ph))
    with pytest.raises(InvalidRequest, match="'dynmole' is not a parrot bank"):
        engine.add_request(image_request("lora", before, after, images[1], "h1", N, ph, bank="dynmole"))
    with pytest.raises(InvalidRequest, match="does not fit this model's vision tower"):
        engine.add_request(image_request("wrong", before, after, images[1], "h1", N, ph, bank="wrong"))
    from server.metrics import ServerMetrics

    metrics = ServerMetrics("tiny-llama")
    engine.set_stats_sink(metrics)
    out = engine.generate([image_request("ok", before, after, images[1], "h1", N, ph, bank="pb")])["ok"]
    assert out[-1].finish_reason == "length" and len(tokens_of(out)) == 6
    text = metrics.render().decode()  # the bank's mixture is labelled by the bank
    assert 'moleserve_routing_decisions_total{bank="pb"} 1.0' in text
    assert any('bank="pb"' in line and 'layer="visual"' in line for line in text.splitlines()
               if line.startswith("moleserve_expert_selections_total{"))
    engine.set_stats_sink(None)

    async def submit_refused():  # the async path answers at once (a 400 before any stream exists)
        from server.engine.async_engine import AsyncEngine

        aeng = AsyncEngine(engine.config, engine=engine)
        await aeng.start()
        try:
            with pytest.raises(InvalidRequest, match="must name a parrot bank"):
                aeng.submit(image_request("async", before, after, images[1], "h1", N, ph))
            stream = aeng.submit(image_request("async-ok", before, after, images[1], "h1", N, ph, bank="pb"))
            return [e async for e in stream]
        finally:
            await aeng.stop()

    events = asyncio.run(submit_refused())
    assert tokens_of(events) == tokens_of(out)
