"""Structured outputs in the engine: a random tiny model's output still matches the grammar, the
mask is applied per row (unconstrained rows of the same batch are untouched), templates are cached,
and the bitmask application matches a per-token reference."""

from __future__ import annotations

import json
import re

import pytest
import torch

from server.engine.protocol import GenerationRequest, InvalidRequest, SamplingParams, StructuredOutput
from server.engine.structured_output import apply_bitmask, as_json_text, validate

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def _text(events):
    return "".join(e.text for e in events)


def _run(engine, specs, temperature=0.0, max_tokens=120, seed=None):
    reqs = [GenerationRequest(f"r{i}", [1, 200 + i, 300], SamplingParams(
        max_tokens=max_tokens if spec is not None else 8, temperature=temperature, seed=seed, structured=spec)) for i, spec in enumerate(specs)]
    out = engine.generate(reqs)
    return [out[r.request_id] for r in reqs]


def test_outputs_match_their_grammars_in_one_batch(make_engine):
    engine = make_engine()
    specs = [StructuredOutput("json", as_json_text(SCHEMA)),
             StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}"),
             StructuredOutput("choice", json.dumps(["positive", "negative", "neutral"])),
             StructuredOutput("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'),
             None]
    for temperature, seed in ((0.0, None), (1.0, 7)):
        results = _run(engine, specs, temperature=temperature, seed=seed)
        for events in results[:4]:
            assert events[-1].finish_reason == "stop", (events[-1].finish_reason, _text(events))
        value = json.loads(_text(results[0]))
        assert set(value) == {"name", "age", "pets"} and isinstance(value["age"], int) and 0 <= value["age"] <= 120
        assert len(value["name"]) <= 8 and set(value["pets"]) <= {"cat", "dog"} and len(value["pets"]) <= 3
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", _text(results[1]))
        assert _text(results[2]) in ("positive", "negative", "neutral")
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", _text(results[3]))
    assert engine.grammars.num_cached == 4  # compiled once each, reused by the second round


def test_unconstrained_rows_keep_their_tokens(make_engine):
    """A constrained request in the batch does not change what an unconstrained one samples."""
    engine = make_engine()
    alone = _run(engine, [None], max_tokens=12)[0]
    mixed = _run(engine, [None, StructuredOutput("regex", "[a-z]+")], max_tokens=12)[0]
    assert [t for e in alone for t in e.token_ids] == [t for e in mixed for t in e.token_ids]


def test_invalid_specs_are_refused():
    for spec in (StructuredOutput("json", '{"type": "nonsense"}'), StructuredOutput("regex", "(unclosed"),
                 StructuredOutput("grammar", "start: missing_rule")):
        with pytest.raises(InvalidRequest, match="invalid"):
            validate(spec)
    validate(StructuredOutput("json", as_json_text(SCHEMA)))


def test_apply_bitmask_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, V = 5, 1000
    logits = torch.randn(B, V, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (V + 31) // 32), dtype=torch.int32, generator=g)
    rows = torch.tensor([0, 2, 4])
    out = apply_bitmask(logits, rows, bitmask)
    expected = logits.clone()
    for j, r in enumerate(rows.tolist()):
        for t in range(V):
            if not (int(bitmask[j, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(apply_bitmask(logits[:3], None, bitmask), expected[[0, 2, 4]].clone().copy_(
        apply_bitmask(logits[:3], torch.arange(3), bitmask)))
