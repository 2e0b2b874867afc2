"""Fixtures of the trainer tests: a few records of the shared sets copied in, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A handful of records in the shared sets' format (copied, so tests do not depend on the files).
RECORDS = [
    {"instruction": "Please choose the correct answer to the question: Which is a mammal?\n\nAnswer1: shark "
                    "Answer2: whale Answer3: trout Answer4: squid\n\nAnswer format: answer1/answer2/answer3/answer4",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    {"instruction": "Please answer the following question with true or false, question: is the sun a star?"
                    "\n\nAnswer format: true/false",
     "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Please choose the correct answer to the question: Water boils at\n\nAnswer1: 10 C "
                    "Answer2: 50 C Answer3: 100 C Answer4: 500 C\n\nAnswer format: answer1/answer2/answer3/answer4",
     "input": "", "output": "the correct answer is answer3", "answer": "answer3"},
    {"instruction": "Please answer the following question with true or false, question: is ice hot?"
                    "\n\nAnswer format: true/false",
     "input": "", "output": "the correct answer is false", "answer": "false"},
]


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(RECORDS * 4))  # 16 records
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from server.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are too small to gain from threads, and on a shared machine an idle
    OpenMP barrier per op costs far more than the op (measured: mixlora steps 7x slower at 2)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
