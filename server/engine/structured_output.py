"""Structured outputs: token masks that keep a request's output inside a grammar (llguidance).

A request's ``StructuredOutput`` (engine/protocol.py: a JSON schema, a regex, a list of choices or a
Lark / GBNF grammar) becomes an llguidance grammar. ``GrammarCompiler`` compiles each distinct one
once into a matcher template (an LRU cache keyed by the spec); every sequence gets a copy of the
template (``LLMatcher.deep_copy``: no recompilation), which the output processor advances by each
token the sequence samples.

Per step, ``fill_bitmask`` computes the allowed-token bitmask of every constrained row in one call
(llguidance's thread pool, no Python loop over tokens): ``[R, ceil(V / 32)]`` int32, bit ``t % 32``
of word ``t // 32`` set when token ``t`` is allowed. ``apply_bitmask`` turns the disallowed logits
of those rows into ``-inf`` with tensor ops (a lookup of each mask byte's 8 bits).

llguidance was picked over xgrammar by measuring both on the default model's tokenizer
(benchmarks/structured_output.py, BENCHMARKS.md): its mask fill for 32 rows is ~3x faster on the
CPU, a new schema compiles in ~2 ms, and it reads Lark and GBNF grammars directly.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from .protocol import InvalidRequest, StructuredOutput

# JSON without free whitespace: "a": 1 is written {"a":1}. A small model given free whitespace can
# spend its whole budget on newlines inside an object (vLLM's guidance backend does the same).
_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_SIZE = 256


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of ``spec`` (raises InvalidRequest when it cannot be one)."""
    import llguidance  # noqa: PLC0415 - only requests with structured outputs need it

    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=_JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", spec.spec)
        if spec.kind == "grammar":
            return llguidance.grammar_from("grammar", spec.spec)
    except ValueError as exc:
        raise InvalidRequest(f"invalid {spec.kind}: {exc}") from None
    raise InvalidRequest(f"unknown structured output kind {spec.kind!r}")


def validate(spec: StructuredOutput) -> None:
    """Raise InvalidRequest naming the problem when ``spec`` does not compile (no tokenizer needed:
    the HTTP layer calls this before a request reaches the engine)."""
    import llguidance  # noqa: PLC0415

    error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    if error:
        raise InvalidRequest(f"invalid {_NAMES[spec.kind]}: {error}")


_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice list", "grammar": "grammar"}


class GrammarCompiler:
    """Compiles specs into matchers for one tokenizer; thread-safe. The tokenizer's llguidance view
    is built on first use (~0.5 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf_tokenizer, self.vocab_size = tokenizer, vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer = None
        self._templates: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf  # noqa: PLC0415

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self._eos[0] if self._eos else None)
        return self._tokenizer

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh matcher for ``spec`` at the start of its output (InvalidRequest if it does not compile)."""
        import llguidance  # noqa: PLC0415

        with self._lock:
            template = self._templates.get(spec)
            if template is None:
                template = llguidance.LLMatcher(self._llg_tokenizer(), grammar_text(spec), log_level=0)
                if template.is_error():
                    raise InvalidRequest(f"invalid {_NAMES[spec.kind]}: {template.get_error()}")
                self._templates[spec] = template
                if len(self._templates) > _CACHE_SIZE:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(spec)
            return template.deep_copy()

    @property
    def num_cached(self) -> int:
        return len(self._templates)


_EXECUTOR = None
_EXECUTOR_LOCK = threading.Lock()


def _executor():
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            import llguidance  # noqa: PLC0415

            _EXECUTOR = llguidance.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
        return _EXECUTOR


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """The allowed-token bitmask ``[len(matchers), ceil(V / 32)]`` int32 of the matchers' next token,
    computed in parallel. A matcher in an error state allows only EOS (it ends the sequence)."""
    mask = torch.empty(len(matchers), bitmask_words(vocab_size), dtype=torch.int32)
    _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(),
                                        mask.shape[1] * 4, len(matchers))
    return mask


# Bit b of byte value x, for every byte value: [256, 8] -> 0 (allowed) or -inf (not allowed).
_BYTE_BITS = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
_BYTE_PENALTY = torch.where(_BYTE_BITS.bool(), 0.0, float("-inf"))


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits [B, V]`` with the tokens a row's bitmask ``[R, W]`` disallows set to ``-inf`` (out of place).

    ``rows [R]``: the logits rows the bitmask rows belong to (None: all rows, R == B). Each mask
    byte indexes a ``[256, 8]`` table of 0 / -inf, added to the row: three tensor ops per step.
    """
    B, V = logits.shape
    table = _BYTE_PENALTY if _BYTE_PENALTY.device == logits.device else _BYTE_PENALTY.to(logits.device)
    byte_ids = bitmask.to(logits.device).contiguous().view(torch.uint8).to(torch.int32)  # [R, 4W], little-endian
    penalty = table.index_select(0, byte_ids.view(-1)).view(bitmask.shape[0], -1)[:, :V]  # [R, V]
    if rows is None:
        return logits + penalty
    out = logits.clone()
    out.index_add_(0, rows, penalty)
    return out


def as_json_text(value: Any) -> str:
    """A JSON value as canonical text (the cache key of a schema)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
