"""``moleserve train --kind parrot`` on a tiny random LLM and a tiny random CLIP tower: data rendering,
both stages (loss goes down), the files a run writes, resume, and the bank served by the engine
with exactly the trainer's log-probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters import load_bank
from adapters.parrot import IMAGE_TOKEN
from adapters.parrot.data import encode_record, load_image_examples
from adapters.train import ConfigError, TrainConfig, train
from adapters.train.data import DataError
from tests.multimodal.builders import TOKENS_PER_IMAGE, make_tower

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTIONS = {"en": ("What colour is this?", {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow"}),
             "pt": ("Que cor é esta?", {"red": "vermelho", "green": "verde", "blue": "azul", "yellow": "amarelo"})}


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> Path:
    return make_tower(tmp_path_factory.mktemp("tower") / "clip")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """16 LLaVA records: 8 coloured images (2 per colour, different sizes), questions in en and pt."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for n, (colour, rgb) in enumerate(COLOURS.items()):
        for k, size in enumerate([(40, 30), (24, 36)]):
            name = f"images/{colour}-{k}.png"
            Image.new("RGB", size, rgb).save(root / name)
            for lang, (q, answers) in QUESTIONS.items():
                image_first = (n + k) % 2 == 0  # the release moves <image> to the front either way
                value = f"{IMAGE_TOKEN}\n{q}" if image_first else f"{q} {IMAGE_TOKEN}"
                records.append({"id": f"{colour}-{k}-{lang}", "image": name,
                                "conversations": [{"from": "human", "value": value},
                                                  {"from": "gpt", "value": answers[colour]}]})
    path = root / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def test_records_render_as_released(tokenizer, tmp_path):
    record = {"image": "x.png", "conversations": [{"from": "human", "value": "What is it? <image>"},
                                                    {"from": "gpt", "value": "A cat."},
                                                    {"from": "human", "value": "Colour?"},
                                                    {"from": "gpt", "value": "Grey."}]}
    ex = encode_record(record, tokenizer, tokens_per_image=5, placeholder_id=0, image_root=tmp_path, cutoff=512)
    ids = list(ex.input_ids)
    assert ids[ex.offset:ex.offset + 5] == [0] * 5
    head = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = head.split("<image>")
    want = tokenizer(before, add_special_tokens=False)["input_ids"]
    assert ids[:ex.offset] == want and head.endswith("<|im_start|>assistant\n")
    assert ids[ex.offset + 5:ex.prompt_len] == tokenizer(after, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode([t for t, m in zip(ids, ex.is_target) if m])
    assert text == "A cat.<|im_end|>\nGrey.<|im_end|>\n"
    assert len(ex.text_rows()) == ex.prompt_len - 5  # the mixture routes on the first prompt's text
    for bad, words in [({"image": "x.png", "conversations": [{"from": "human", "value": "no image"},
                                                             {"from": "gpt", "value": "a"}]}, "exactly one <image>"),
                       ({"conversations": []}, "image"),
                       ({"image": "x.png", "conversations": [{"from": "human", "value": "<image> q"}]}, "answer")]:
        with pytest.raises(DataError, match=words):
            encode_record(bad, tokenizer, tokens_per_image=5, placeholder_id=0, image_root=tmp_path, cutoff=512)
    with pytest.raises(DataError, match="not found"):
        load_image_examples([_write(tmp_path / "d.json", [record])], tokenizer, tokens_per_image=5, placeholder_id=0)


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def _config(data_file, tower_dir, tiny_model_dir, out, **kw) -> TrainConfig:
    base = dict(data=[str(data_file)], out=str(out), model=str(tiny_model_dir), kind="parrot",
                vision_tower=str(tower_dir), batch_size=4, micro_batch_size=4, lr=3e-2, progress=False, experts=3,
                moe_intermediate_size=32)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from server.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def stage_runs(data_file, tower_dir, tiny_model_dir, tokenizer, llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = lambda out, **kw: _config(data_file, tower_dir, tiny_model_dir, root / out, **kw)  # noqa: E731
    one = train(cfg("stage1", stage=1, max_steps=12), tokenizer=tokenizer, model=llm)
    two = train(cfg("stage2", stage=2, max_steps=12), tokenizer=tokenizer, model=llm)

    def data_loss(stage: int, init: str | None) -> float:
        """The mean LM loss over all 16 examples of the bank ``init`` (None: a fresh adapter)."""
        out = root / f"eval-{stage}-{Path(init).name if init else 'fresh'}"
        run = train(cfg(out.name, stage=stage, init=init, lr=0.0, max_steps=1, batch_size=16, micro_batch_size=8),
                    tokenizer=tokenizer, model=llm)
        return run.history[0]["loss"]

    losses = {"fresh 1": data_loss(1, None), "stage1": data_loss(1, str(root / "stage1")),
              "fresh 2": data_loss(2, None), "stage2": data_loss(2, str(root / "stage2")),
              "stage2 from stage1": data_loss(2, str(root / "stage1"))}
    return root, one, two, losses


def test_both_stages_lower_the_loss_and_write_a_bank(stage_runs, tiny_model_dir):
    from tests.adapters.bank_builders import fingerprint_of

    root, one, two, losses = stage_runs
    assert losses["stage1"] < losses["fresh 1"] - 0.05, losses
    assert losses["stage2"] < losses["fresh 2"] - 0.05, losses
    # zero-initialised experts and moe_weight 1: a stage 2 from stage 1's bank starts exactly at it
    assert losses["stage2 from stage1"] == pytest.approx(losses["stage1"], abs=1e-5)
    for result in (one, two):
        for name in ("bank.json", "weights.safetensors", "training.json", "curves.png", "checkpoint.pt"):
            assert (result.out / name).is_file(), name
    b1 = load_bank(root / "stage1", base=fingerprint_of(tiny_model_dir))
    b2 = load_bank(root / "stage2", base=fingerprint_of(tiny_model_dir))
    assert b1.parrot.config.num_experts == 0 and not b1.parrot.config.use_moe
    assert b2.parrot.config.num_experts == 3 and b2.parrot.config.use_moe
    assert b1.parrot.tokens_per_image == b2.parrot.tokens_per_image == TOKENS_PER_IMAGE
    assert b2.parrot.config.mm_hidden_size == 32 and b2.parrot.config.select_feature == "cls_patch"
    summary = json.loads((root / "stage2" / "training.json").read_text())
    assert summary["images"] == 8 and summary["examples"] == 16 and len(summary["history"]) == 12
    h = summary["history"][-1]
    assert len(h["load"]) == 3 and abs(sum(h["load"]) - 1) < 1e-4 and 0 <= h["entropy"] <= 1
    # the mixture was trained: its experts left their zero start and the router its random one
    assert all(float(b2.extra[f"moe_model.experts.{e}.down_proj.weight"].abs().max()) > 0 for e in range(3))
    assert h["entropy"] != summary["history"][0]["entropy"]


def test_resume_continues_the_run(data_file, tower_dir, tiny_model_dir, tokenizer, llm, tmp_path):
    def run(out, **kw):
        return train(_config(data_file, tower_dir, tiny_model_dir, tmp_path / out, stage=2, **kw),
                     tokenizer=tokenizer, model=llm)

    full = run("full", max_steps=3)
    run("part", max_steps=1)
    resumed = run("part", max_steps=3)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-5)
    with pytest.raises(ValueError, match="different configuration"):
        run("part", max_steps=4, lr=1e-4)


def test_config_refusals(data_file, tower_dir, tiny_model_dir, tokenizer, llm, tmp_path):
    for kw, words in [({"vision_tower": None}, "--vision-tower"), ({"stage": 3}, "stage must be"),
                      ({"vision_tower": str(tmp_path / "nowhere")}, "--vision-tower"),
                      ({"init": str(tmp_path / "nothing")}, "--init")]:
        with pytest.raises(ConfigError, match=words):
            train(_config(data_file, tower_dir, tiny_model_dir, tmp_path / "x", **kw), tokenizer=tokenizer, model=llm)


def test_the_bank_serves_what_it_learned(stage_runs, data_file, tower_dir, tiny_model_dir, tokenizer):
    """The engine (Llama + --vision-tower, the bank from the registry) gives each answer token the
    log-probability the trainer's forward gives it."""
    from PIL import Image

    from adapters.parrot.bank import TowerSpec, visual_adapter
    from adapters.parrot.train import ParrotObjective, encode_images
    from adapters.runtime import BankRegistry
    from server.engine.protocol import GenerationRequest, SamplingParams
    from server.multimodal import ImageInput
    from server.multimodal.image_processor import ImageProcessor
    from tests.runtime.helpers import make_engine

    root = stage_runs[0]
    engine = make_engine(tiny_model_dir, None, vision_tower=str(tower_dir))
    registry = BankRegistry(engine.model_config, tower=TowerSpec.of(engine.vision.tower), allowed_roots=[root])
    engine.set_adapter_provider(registry)
    registry.load_sync("colours", root / "stage2")
    spec = engine.multimodal_spec
    examples = load_image_examples([data_file], tokenizer, tokens_per_image=spec.tokens_per_image,
                                   placeholder_id=spec.placeholder_token_id)[:4]
    processor = ImageProcessor.from_folder(tower_dir, aspect="pad")
    feats = encode_images([ex.image for ex in examples], engine.vision.tower, processor, progress=False)
    bank = load_bank(root / "stage2")
    objective = ParrotObjective(engine.model, visual_adapter(bank), feats)
    requests = []
    for n, ex in enumerate(examples):
        with Image.open(ex.image) as img:
            pixels = processor(img.convert("RGB"))
        image = ImageInput(pixel_values=pixels, content_hash=f"h{n}", offset=ex.offset, length=ex.length)
        requests.append(GenerationRequest(f"r{n}", list(ex.input_ids), SamplingParams(max_tokens=1, temperature=0.0,
                                          prompt_logprobs=True), bank="colours", images=[image]))
    outs = engine.generate(requests)
    for n, ex in enumerate(examples):
        served = torch.tensor(outs[f"r{n}"][0].prompt_logprobs)  # log p(token i+1 | <= i)
        with torch.no_grad():
            from adapters.train.objective import FlatBatch

            batch = FlatBatch.of([ex])
            loss, _ = objective([ex])
        rows = batch.predict_rows
        assert torch.allclose(served[rows].mean().neg(), loss, atol=1e-4), (served[rows].mean(), loss)


def test_the_llm_stays_frozen(stage_runs, llm, tiny_model_dir):
    """Both stages train the projector (and the mixture) only: the language model they ran on is
    bit for bit the one on disk."""
    from server.model import load_model

    fresh = load_model(tiny_model_dir).state_dict()
    for name, t in llm.state_dict().items():
        assert torch.equal(t, fresh[name]), name
    assert not any(p.requires_grad for p in llm.parameters())


def test_cli_trains_a_parrot_bank_with_progress_bars(data_file, tower_dir, tiny_model_dir, tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "cli-parrot"
    rc = main(["train", "--kind", "parrot", "--stage", "2", "--model", str(tiny_model_dir), "--data", str(data_file),
               "--vision-tower", str(tower_dir), "--out", str(out), "--experts", "2", "--moe-intermediate-size", "16",
               "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "encode images" in captured.err and "train parrot (stage 2)" in captured.err  # the tqdm bars
    for name in ("bank.json", "weights.safetensors", "training.json", "curves.png"):
        assert (out / name).is_file(), name
    bank = load_bank(out)
    assert bank.kind == "parrot" and bank.parrot.config.num_experts == 2 and bank.name == "cli-parrot"
    rc = main(["train", "--kind", "parrot", "--model", str(tiny_model_dir), "--data", str(data_file),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--vision-tower" in capsys.readouterr().err
