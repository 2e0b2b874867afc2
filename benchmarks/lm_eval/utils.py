"""LLM-Adapters' ARC records (question and options inside ``instruction``) -> question, choices, label."""

import re


def process_docs(dataset):
    def split(doc):
        text = doc["instruction"].split("Please choose the correct answer to the question: ", 1)[-1]
        question, rest = text.split("\n\n", 1)
        options = rest.split("\n\nAnswer format")[0]
        choices = [c.strip() for c in re.split(r"Answer\d+: ", options) if c.strip()]
        return {"question": question.strip(), "choices": choices, "label": int(doc["answer"][-1]) - 1}

    return dataset.map(split)
