"""Training data: LLM-Adapters JSON (instruction / input / output) or chat JSONL, tokenised with the
prompt masked out of the loss.

An ``Example`` is one sequence of token ids and a mask of the tokens the LM loss predicts (the
response and its EOS; for chats, every assistant turn). Batches are flat: the model
sees the sequences one after the other, with no padding.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """A training or evaluation file that cannot be read as one of the supported formats."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The LLM-Adapters (Alpaca) prompt, ending where the response starts."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    is_target: tuple[bool, ...]  # per token: predicted by the LM loss (never the first token)

    @property
    def num_targets(self) -> int:
        return sum(self.is_target)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of records, or JSONL (one object per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"{path}: not JSON or JSONL ({exc})") from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: every record must be a JSON object")
    return records


def tokenize_record(record: dict[str, Any], tokenizer, cutoff: int) -> Example | None:
    """One record -> Example (None when nothing to learn remains after the cutoff)."""
    eos = tokenizer.eos_token_id
    if "messages" in record:
        ids, is_target = _chat_tokens(record["messages"], tokenizer)
    elif "instruction" in record and "output" in record:
        prompt = tokenizer(alpaca_prompt(str(record["instruction"]), str(record.get("input") or "")))["input_ids"]
        response = tokenizer(str(record["output"]))["input_ids"] + ([eos] if eos is not None else [])
        ids, is_target = list(prompt) + list(response), [False] * len(prompt) + [True] * len(response)
    else:
        raise DataError("a record needs instruction/output (LLM-Adapters) or messages (chat)")
    ids, is_target = ids[:cutoff], [False] + is_target[1:cutoff]
    if not any(is_target):
        return None
    return Example(tuple(ids), tuple(is_target))


def _chat_tokens(messages: Any, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and which of them belong to assistant turns (checked prefix by prefix)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list")

    def template(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    ids: list[int] = []
    is_target: list[bool] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError("each message needs role and content")
        if msg["role"] == "assistant":
            head = template(messages[:i], True)
            ids, is_target = head, is_target + [False] * (len(head) - len(ids))
        full = template(messages[: i + 1], False)
        new = len(full) - len(ids)
        ids, is_target = full, is_target + [msg["role"] == "assistant"] * new
    return ids, is_target


def load_examples(paths: Iterable[str | Path], tokenizer, *, cutoff: int = 512, limit: int | None = None,
                  seed: int = 0) -> list[Example]:
    """Every record of every file, tokenised; with ``limit``, a seeded random subset of that size
    drawn from the union (the same subset for the same files, limit and seed)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        records.extend(read_records(path))
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    examples = []
    for record in records:
        ex = tokenize_record(record, tokenizer, cutoff)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise DataError("no usable training examples (empty files, or every response cut off)")
    return examples


def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The shuffled example order of one epoch; the same on every rank and after a resume."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
