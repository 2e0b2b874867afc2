"""adapters/parrot/demo_data.py: LLaVA-format records on scikit-learn's digits, six languages,
deterministic, a split with no shared scan, answers that match the labels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn", reason="scikit-learn (moleserve[vision]) is not installed")

from adapters.parrot.demo_data import (COLOURS, DIGITS, INKS, LANGUAGES, PARITY, TASKS, build_demo_data,  # noqa: E402
                                       load_digits, render)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo"), train_per_language=30, test_per_language=12, seed=0)


def test_llava_format_languages_and_tasks(built):
    train = json.loads(built.train.read_text(encoding="utf-8"))
    test = json.loads(built.test.read_text(encoding="utf-8"))
    assert len(train) == 30 * len(LANGUAGES) and len(test) == 12 * len(LANGUAGES)
    assert Counter(r["language"] for r in test) == {lang: 12 for lang in LANGUAGES}
    assert Counter(r["task"] for r in test) == {task: 12 * len(LANGUAGES) // len(TASKS) for task in TASKS}
    for r in train + test:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] == r["answer"] and " " not in r["answer"]
        image = Image.open(built.train.parent / r["image"])
        assert image.mode == "RGB" and image.size == (64, 64)


def test_answers_match_labels_and_the_split_shares_no_scan(built):
    scans, labels = load_digits()
    seen = {}
    for split in ("train", "test"):
        for r in json.loads((built.train.parent / f"{split}.json").read_text(encoding="utf-8")):
            scan = int(r["image"].split("digit")[1][:4])
            colour = r["image"].rsplit("_", 1)[1].removesuffix(".png")
            seen.setdefault(split, set()).add(scan)
            digit, lang = int(labels[scan]), r["language"]
            expected = {"digit": DIGITS[lang][digit], "colour": COLOURS[lang][colour],
                        "parity": PARITY[lang][digit % 2]}[r["task"]]
            assert r["answer"] == expected
    assert not seen["train"] & seen["test"]


def test_deterministic(built, tmp_path):
    again = build_demo_data(tmp_path, train_per_language=30, test_per_language=12, seed=0)
    assert again.train.read_bytes() == built.train.read_bytes()
    assert again.test.read_bytes() == built.test.read_bytes()
    name = json.loads(again.test.read_text(encoding="utf-8"))[0]["image"]
    assert (tmp_path / name).read_bytes() == (built.train.parent / name).read_bytes()


def test_render_inks_the_scan():
    scan = np.zeros((8, 8), dtype=np.float32)
    scan[2:6, 3:5] = 16
    image = np.asarray(render(scan, "blue"))
    assert tuple(image[0, 0]) == (255, 255, 255)
    assert np.abs(image[32, 32].astype(int) - INKS["blue"]).max() < 60  # bicubic upscaling blurs the edges
    assert image[32, 32, 2] > 150 > image[32, 32, 0]
