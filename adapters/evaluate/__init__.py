"""Accuracy of banks on LLM-Adapters-format multiple-choice and true/false sets (``moleserve eval``)."""

from .generators import ChoiceScorer, EngineGenerator, Generator, LocalRunner
from .runner import MODES, SetResult, evaluate_set, format_table, summary
from .tasks import FAMILIES, EvalItem, extract_answer, load_eval_set, parse_item, set_name

__all__ = [
    "FAMILIES", "MODES", "ChoiceScorer", "EngineGenerator", "EvalItem", "Generator", "LocalRunner", "SetResult", "evaluate_set",
    "extract_answer", "format_table", "load_eval_set", "parse_item", "set_name", "summary",
]
