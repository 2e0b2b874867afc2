"""Accuracy of a model (with or without a bank) on LLM-Adapters-format sets.

Two modes: ``generate`` (greedy generation, the label extracted as the papers do) and ``loglik``
(the label whose response "the correct answer is <label>" is most likely; no extraction needed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .generators import ChoiceScorer, EngineGenerator, Generator
from .tasks import _PATTERNS, FAMILIES, RESPONSE_PREFIX, EvalItem, extract_answer

MODES = ("generate", "loglik")


@dataclass
class SetResult:
    name: str
    mode: str
    n: int
    correct: int
    seconds: float
    unanswered: int = 0  # generate mode: no label found in the generation
    predictions: list[str] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)  # image sets: [correct, n] per language / task

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        d["accuracy"] = self.accuracy
        if not with_predictions:
            d.pop("predictions")
        if not self.groups:
            d.pop("groups")
        else:
            d["groups"] = {k: {"accuracy": c / n if n else 0.0, "correct": c, "n": n} for k, (c, n) in self.groups.items()}
        return d


def evaluate_set(name: str, items: list[EvalItem], tokenizer, *, mode: str = "generate",
                 generator: Generator | None = None, scorer: ChoiceScorer | None = None,
                 max_tokens: int = 32) -> SetResult:
    t0 = time.perf_counter()
    prompts = [tokenizer(item.prompt)["input_ids"] for item in items]
    if mode == "generate":
        assert generator is not None
        # The answer is the first label in the text: once one appears, later tokens cannot change
        # it, so generation for that item stops there (exactly the same extraction, fewer steps).
        def decided(family):
            return lambda toks: _PATTERNS[family].search(tokenizer.decode(toks, skip_special_tokens=True)) is not None

        preds: list[str] = [""] * len(items)
        for family in sorted({item.family for item in items}):
            idx = [i for i, item in enumerate(items) if item.family == family]
            kwargs = {"stop": list(FAMILIES[family])} if isinstance(generator, EngineGenerator) else {}
            outs = generator.generate([prompts[i] for i in idx], max_tokens, decided(family), **kwargs)
            for i, out in zip(idx, outs):
                preds[i] = extract_answer(tokenizer.decode(out, skip_special_tokens=True), family)
    elif mode == "loglik":
        assert scorer is not None
        prefixes, conts = [], []
        for item, prompt in zip(items, prompts):
            full = [tokenizer(RESPONSE_PREFIX + c)["input_ids"] for c in item.choices]
            common = _common_prefix_len(full)
            prefixes.append(list(prompt) + full[0][:common])
            conts.append([f[common:] for f in full])
        scores = scorer.score(prefixes, conts)
        preds = [item.choices[max(range(len(s)), key=s.__getitem__)] for item, s in zip(items, scores)]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    correct = sum(p == item.answer for p, item in zip(preds, items))
    return SetResult(name=name, mode=mode, n=len(items), correct=correct, seconds=time.perf_counter() - t0,
                     unanswered=sum(p == "" for p in preds), predictions=preds)


def _common_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens shared by all sequences, leaving at least one token in each."""
    n = min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


def format_table(results: list[SetResult]) -> str:
    lines = [f"{'set':<16} {'mode':<9} {'n':>5} {'accuracy':>9} {'no answer':>10} {'seconds':>8}"]
    for r in results:
        lines.append(f"{r.name:<16} {r.mode:<9} {r.n:>5} {100 * r.accuracy:>8.1f}% {r.unanswered:>10} {r.seconds:>8.1f}")
    if len(results) > 1:
        avg = sum(r.accuracy for r in results) / len(results)
        lines.append(f"{'average':<16} {'':<9} {sum(r.n for r in results):>5} {100 * avg:>8.1f}%")
    return "\n".join(lines)


def summary(results: list[SetResult], **meta) -> dict:
    """The JSON report: ``accuracy`` (mean over sets) and ``sets`` (per-set numbers)."""
    accuracy = sum(r.accuracy for r in results) / len(results) if results else 0.0
    return {"accuracy": accuracy, "sets": {r.name: r.to_dict(with_predictions=True) for r in results}, **meta}
