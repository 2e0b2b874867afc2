"""Parrot training data: LLaVA's JSON format, rendered as the release renders it (ALGORITHMS.md §5).

A record is ``{"image": "relative/path.png", "conversations": [{"from": "human", "value":
"<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}`` (a JSON list, or JSONL). As in the
release, ``<image>`` is moved to the start of its turn, followed by a newline; the conversation is
rendered through the model's chat template (Qwen's ChatML for Parrot; the same template the server
renders requests with), the text is tokenised in pieces split at ``<image>`` (no special tokens
added) and the image takes ``tokens_per_image`` placeholder positions. The LM loss covers the
assistant turns (answer and end-of-turn) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.train.data import DataError, read_records

from .config import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ImageExample:
    """One training sequence.

    input_ids: the ids, with ``length`` placeholder ids at ``offset`` where the image goes.
    is_target: per token, predicted by the LM loss. prompt_len: tokens of the first prompt (up to
    and including the first assistant header): the text the serving-time mixture routes on.
    image: the image file.
    """

    input_ids: tuple[int, ...]
    is_target: tuple[bool, ...]
    offset: int
    length: int
    prompt_len: int
    image: Path

    def text_rows(self) -> list[int]:
        """Rows of the prompt's text tokens (the image span excluded): what the mixture routes on."""
        return [i for i in range(self.prompt_len) if not self.offset <= i < self.offset + self.length]


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("a record needs conversations: a non-empty list of {from, value}")
    out = []
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"conversation turns need from (one of {', '.join(ROLES)}) and a string value")
        text = turn["value"]
        if IMAGE_TOKEN in text:  # the release (LLaVA's preprocess_multimodal): the image first, then a newline
            text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
        out.append({"role": ROLES[turn["from"]], "content": text})
    return out


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def encode_record(record: dict[str, Any], tokenizer, *, tokens_per_image: int, placeholder_id: int,
                  image_root: Path, cutoff: int) -> ImageExample | None:
    """One LLaVA record -> ImageExample (None when the cutoff leaves no answer token)."""
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise DataError("a record needs image: the image file's path (relative to the data file or --image-folder)")
    messages = _messages(record)
    if sum(m["content"].count(IMAGE_TOKEN) for m in messages) != 1 or not any(
            IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "user"):
        raise DataError(f"a record must hold exactly one {IMAGE_TOKEN}, in a user turn (one image per prompt, as released)")
    # The rendered text, cut into (text, is_target) chunks: each assistant turn is a target chunk.
    chunks: list[tuple[str, bool]] = []
    done = ""
    prompt_chars = None
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[:i + 1], False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError("the chat template does not render the conversation prefix by prefix")
        chunks += [(head[len(done):], False), (full[len(head):], True)]
        prompt_chars = len(head) if prompt_chars is None else prompt_chars
        done = full
    if prompt_chars is None:
        raise DataError("a record needs at least one answer (a gpt turn)")
    ids: list[int] = []
    is_target: list[bool] = []
    offset = prompt_len = -1
    for n_chunk, (text, target) in enumerate(chunks):
        pieces = text.split(IMAGE_TOKEN)
        for j, piece in enumerate(pieces):
            if j > 0:  # the image between two pieces
                offset = len(ids)
                ids += [placeholder_id] * tokens_per_image
                is_target += [False] * tokens_per_image
            if piece:
                toks = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                is_target += [target] * len(toks)
        if n_chunk == 0:
            prompt_len = len(ids)
    if offset < 0:
        raise DataError(f"the rendered prompt lost the {IMAGE_TOKEN} marker (chat template)")
    ids, is_target = ids[:cutoff], [False] + is_target[1:cutoff]
    if offset + tokens_per_image > len(ids) or not any(is_target):
        return None
    return ImageExample(tuple(ids), tuple(is_target), offset, tokens_per_image, min(prompt_len, len(ids)),
                        image_root / image)


def load_image_examples(paths: list[str | Path], tokenizer, *, tokens_per_image: int, placeholder_id: int,
                        cutoff: int = 2048, image_folder: str | Path | None = None, limit: int | None = None,
                        seed: int = 0) -> list[ImageExample]:
    """Every record of every file; image paths are relative to ``image_folder`` or else to the data
    file's folder. With ``limit``, a seeded random subset of the union."""
    import random

    records: list[tuple[dict[str, Any], Path]] = []
    for path in paths:
        root = Path(image_folder) if image_folder is not None else Path(path).parent
        records += [(r, root) for r in read_records(path)]
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    examples = []
    for n, (record, root) in enumerate(records):
        try:
            ex = encode_record(record, tokenizer, tokens_per_image=tokens_per_image, placeholder_id=placeholder_id,
                               image_root=root, cutoff=cutoff)
        except DataError as exc:
            raise DataError(f"record {n} ({record.get('id', 'no id')}): {exc}") from None
        if ex is not None:
            if not ex.image.is_file():
                raise DataError(f"record {n} ({record.get('id', 'no id')}): image {str(ex.image)!r} not found")
            examples.append(ex)
    if not examples:
        raise DataError("no usable training examples (empty files, or every answer cut off)")
    return examples
