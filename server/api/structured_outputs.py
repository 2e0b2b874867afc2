"""The request fields that constrain an output, turned into the engine's ``StructuredOutput``.

OpenAI's ``response_format`` (``json_object``; ``json_schema`` with ``name``, ``schema`` and
``strict``) and vLLM's extras ``guided_json``, ``guided_regex``, ``guided_choice`` and
``guided_grammar`` (Lark or GBNF). At most one may be set. The grammar is checked here, before the
request reaches the engine, so a bad one is a 400 naming its field. The constraint is always
enforced, ``strict`` or not (as vLLM does): the output of a request that finishes with ``stop``
parses and matches.
"""

from __future__ import annotations

import json
from typing import Any

from server.engine import structured_output
from server.engine.protocol import InvalidRequest, StructuredOutput

from .errors import APIError

JSON_OBJECT = {"type": "object"}


def from_request(req: Any) -> tuple[StructuredOutput | None, str | None]:
    """(the request's constraint or None, the name of the field it came from). Raises a 400 naming
    the field for a malformed or conflicting one; the grammar itself is checked by ``check``."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        kind = rf.get("type", "text") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", StructuredOutput("json", structured_output.as_json_text(JSON_OBJECT))))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                               param="response_format")
            found.append(("response_format", StructuredOutput("json", structured_output.as_json_text(schema))))
        elif kind != "text":
            raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                           param="response_format")
    guided_json = getattr(req, "guided_json", None)
    if guided_json is not None:
        schema = guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise APIError(400, f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        if not isinstance(schema, dict):
            raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
        found.append(("guided_json", StructuredOutput("json", structured_output.as_json_text(schema))))
    if getattr(req, "guided_regex", None) is not None:
        found.append(("guided_regex", StructuredOutput("regex", req.guided_regex)))
    if getattr(req, "guided_choice", None) is not None:
        if not req.guided_choice:
            raise APIError(400, "guided_choice must list at least one string", param="guided_choice")
        found.append(("guided_choice", StructuredOutput("choice", json.dumps(list(req.guided_choice)))))
    if getattr(req, "guided_grammar", None) is not None:
        found.append(("guided_grammar", StructuredOutput("grammar", req.guided_grammar)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"set at most one of response_format, guided_json, guided_regex, guided_choice and "
                            f"guided_grammar (got {names})", param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, None)


def check(spec: StructuredOutput, param: str) -> None:
    """A 400 naming ``param`` when ``spec``'s grammar does not compile (blocking: run it off the loop)."""
    try:
        structured_output.validate(spec)
    except InvalidRequest as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
