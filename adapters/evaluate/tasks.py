"""Evaluation sets in the LLM-Adapters format: parsing, the prompt, and answer extraction.

Each record holds ``instruction`` (question, choices and "Answer format: a/b/..."), ``input``
(usually empty) and ``answer`` (the gold label: ``true``/``false``, ``answer1``..``answer5``,
``option1``/``option2``, ``solution1``/``solution2``, ``ending1``..``ending4``).

Answer extraction follows LLM-Adapters' ``commonsense_evaluate.py`` (used by the DoRA, MixLoRA and
DynMoLE evaluations): the generation after "### Response:" is searched for the first occurrence of
any label of the set's family (case-sensitive); no occurrence counts as wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from adapters.train.data import DataError, alpaca_prompt, read_records

FAMILIES: dict[str, tuple[str, ...]] = {
    "truefalse": ("true", "false"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "option": ("option1", "option2"),
    "solution": ("solution1", "solution2"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
}
_PATTERNS = {family: re.compile("|".join(labels)) for family, labels in FAMILIES.items()}
_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_/ ]+?)\s*$")
RESPONSE_PREFIX = "the correct answer is "  # how the training sets' outputs phrase the answer


@dataclass(frozen=True)
class EvalItem:
    prompt: str  # the Alpaca prompt, ending where the response starts
    answer: str  # gold label
    choices: tuple[str, ...]  # this item's labels (from "Answer format:", else the family's)
    family: str


def family_of(label: str) -> str:
    for family, labels in FAMILIES.items():
        if label in labels:
            return family
    raise DataError(f"gold answer {label!r} is not a label of a known family ({', '.join(FAMILIES)})")


def parse_item(record: dict) -> EvalItem:
    if "instruction" not in record or "answer" not in record:
        raise DataError("an evaluation record needs instruction and answer")
    instruction, answer = str(record["instruction"]), str(record["answer"]).strip()
    family = family_of(answer)
    choices = FAMILIES[family]
    match = _FORMAT.search(instruction.strip())
    if match:
        listed = tuple(c.strip() for c in match.group(1).split("/") if c.strip())
        if listed and all(c in FAMILIES[family] for c in listed) and answer in listed:
            choices = listed
    return EvalItem(alpaca_prompt(instruction, str(record.get("input") or "")), answer, choices, family)


def load_eval_set(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` items of a file (the papers' order), parsed."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    items = [parse_item(r) for r in records]
    if not items:
        raise DataError(f"{path}: no evaluation items")
    return items


def set_name(path: str | Path) -> str:
    """``.../commonsense/ARC-Easy/test.json`` -> ``ARC-Easy``; else the file's stem."""
    p = Path(path)
    return p.parent.name if p.stem in ("test", "train", "dev", "validation") else p.stem


def extract_answer(generation: str, family: str) -> str:
    """The first label of ``family`` in the text after "### Response:" ("" if none)."""
    text = generation.split("### Response:")[-1].strip()
    found = _PATTERNS[family].search(text)
    return found.group(0) if found else ""
