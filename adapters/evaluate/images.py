"""Image question sets in LLaVA's JSON format, scored by exact match (``moleserve eval`` on a model
with a vision tower; the Parrot demo's accuracy, benchmarks/parrot_demo.py).

A record: ``{"image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "<answer>"}, ...]}`` (``image`` relative to ``--image-folder`` or to the
data file's folder, as in training). The question is the first human turn without ``<image>``, the
gold answer the first gpt turn (or ``answer`` when the record has one); optional ``language`` and
``task`` keys group the accuracy. The prompt is the one a chat request ``[image, question]`` gets
(``server.multimodal.prompt.image_chat_prompt``); the greedy answer is right when it equals the
gold one after ``normalise`` (NFKC, case-folded, surrounding quotes and final punctuation dropped).
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.train.data import DataError, read_records

from .runner import SetResult

IMAGE_TOKEN = "<image>"
CHUNK = 64  # questions submitted to the engine at once (their pixel values live until they finish)


def normalise(text: str) -> str:
    """An answer as exact match compares it: NFKC, case-folded, no leading quotes or spaces, no
    trailing punctuation (Latin and CJK) or spaces."""
    text = unicodedata.normalize("NFKC", text).strip().casefold()
    return re.sub(r"[\s\.\!\?。！？,，:;'\"]+$", "", re.sub(r"^[\s'\"]+", "", text))


def exact_match(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


@dataclass(frozen=True)
class ImageQuestion:
    image: Path
    question: str
    answer: str
    groups: tuple[str, ...] = ()  # e.g. ("en", "en/digit"): where the item counts besides the whole set


def is_image_record(record: Any) -> bool:
    return isinstance(record, dict) and "image" in record and "conversations" in record


def parse_image_question(record: dict, root: Path) -> ImageQuestion:
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise DataError("an image question needs image: the image file's path")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError("an image question needs conversations: a list of {from, value}")
    human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
    gpt = record.get("answer", next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None))
    if not isinstance(human, str) or not isinstance(gpt, str):
        raise DataError("an image question needs a human turn (the question) and a gpt turn or answer (the gold answer)")
    if human.count(IMAGE_TOKEN) > 1:
        raise DataError(f"an image question holds one {IMAGE_TOKEN} at most (one image per prompt, as released)")
    groups = []
    if isinstance(record.get("language"), str):
        groups.append(record["language"])
        if isinstance(record.get("task"), str):
            groups.append(f"{record['language']}/{record['task']}")
    return ImageQuestion(root / image, human.replace(IMAGE_TOKEN, "").strip(), gpt, tuple(groups))


def load_image_questions(path: str | Path, *, image_folder: str | Path | None = None,
                         limit: int | None = None) -> list[ImageQuestion]:
    """The first ``limit`` questions of a LLaVA-format file, images checked to exist."""
    records = read_records(path)[:limit] if limit is not None else read_records(path)
    root = Path(image_folder) if image_folder is not None else Path(path).parent
    items = []
    for n, record in enumerate(records):
        if not is_image_record(record):
            raise DataError(f"{path}: record {n} is not an image question (needs image and conversations)")
        try:
            item = parse_image_question(record, root)
        except DataError as exc:
            raise DataError(f"{path}: record {n}: {exc}") from None
        if not item.image.is_file():
            raise DataError(f"{path}: record {n}: image {str(item.image)!r} not found")
        items.append(item)
    if not items:
        raise DataError(f"{path}: no evaluation items")
    return items


def evaluate_image_set(name: str, items: list[ImageQuestion], tokenizer, generator, *, max_tokens: int = 32) -> SetResult:
    """Exact-match accuracy of greedy answers through ``generator`` (an ``EngineGenerator`` built
    with the model's vision side); ``SetResult.groups`` holds [correct, n] per group."""
    from server.engine.protocol import InvalidRequest
    from server.multimodal.media import MediaError, MediaPolicy, decode_image
    from server.multimodal.prompt import image_chat_prompt

    spec = generator.engine.multimodal_spec
    if spec is None:
        raise DataError(f"{name}: an image question set needs a model with a vision tower (--vision-tower, or a Parrot checkpoint)")
    if spec.needs_bank and generator.bank_name is None:
        raise DataError(f"{name}: this base has a tower and no projector; name a parrot bank with --bank")
    t0 = time.perf_counter()
    policy = MediaPolicy()
    preds: list[str] = []
    for start in range(0, len(items), CHUNK):
        prompts, images = [], []
        for item in items[start:start + CHUNK]:
            try:
                loaded = decode_image(item.image.read_bytes(), policy)
            except MediaError as exc:
                raise DataError(f"{item.image}: {exc}") from None
            ids, inputs = image_chat_prompt(tokenizer, spec, item.question, spec.processor(loaded.image),
                                            loaded.content_hash)
            prompts.append(ids)
            images.append(inputs)
        try:
            outs = generator.generate(prompts, max_tokens, images=images)
        except InvalidRequest as exc:  # e.g. a question longer than the model's image prompts may be
            raise DataError(f"{name}: the engine refused a question: {exc}") from None
        for out in outs:
            preds.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    groups: dict[str, list[int]] = {}
    correct = 0
    for item, pred in zip(items, preds):
        ok = exact_match(pred, item.answer)
        correct += ok
        for key in item.groups:
            hit = groups.setdefault(key, [0, 0])
            hit[0] += ok
            hit[1] += 1
    return SetResult(name=name, mode="exact", n=len(items), correct=correct, seconds=time.perf_counter() - t0,
                     unanswered=sum(p == "" for p in preds), predictions=preds, groups=groups)
