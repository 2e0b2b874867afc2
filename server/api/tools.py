"""``tools`` and ``tool_choice`` of a chat request: what goes into the prompt, and what constrains
and parses the output.

* The tools are passed to the model's chat template (``tools=``), as Hugging Face templates of
  tool-calling models (Qwen 2.5, Hermes, Llama 3.1, ...) expect. A template that does not use them
  (the default SmolLM2's) gets them the way Qwen 2.5's template writes them: a ``# Tools`` section
  in the system message asking for ``<tool_call>`` blocks; earlier calls and tool results in the
  history are written as ``<tool_call>`` / ``<tool_response>`` text for such a template.
* ``tool_choice``: ``auto`` (the default with tools): the output is parsed by the
  ``--tool-call-parser``; ``none``: no tools in the prompt, plain text out; ``required``: the
  output is constrained (structured outputs) to a JSON array of one or more calls ``{"name",
  "parameters"}`` of the given tools; a named function: the output is constrained to that
  function's parameters schema and becomes its one call (vLLM's behaviour for both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.engine.protocol import StructuredOutput
from server.engine.structured_output import as_json_text

from .errors import APIError
from .tool_parsers import ParsedCall

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    """What a chat request's tools do to it. ``mode``: "none" (no tools), "auto", "required", "named"."""

    mode: str
    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}}, as given
    named: str | None = None  # the function tool_choice names
    structured: StructuredOutput | None = None


def plan(tools: list[Any] | None, tool_choice: Any) -> ToolPlan:
    """The request's ``ToolPlan``; a 400 naming ``tools`` or ``tool_choice`` when they do not fit together."""
    specs = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t for t in tools or []]
    names = [t["function"]["name"] for t in specs]
    if len(set(names)) != len(names):
        raise APIError(400, "tool function names must be unique", param="tools")
    if tool_choice is None:
        tool_choice = "auto" if specs else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or a named function, got {tool_choice!r}",
                           param="tool_choice")
        if tool_choice != "none" and not specs:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        if tool_choice == "required":
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                       "parameters": t["function"].get("parameters") or ANY_OBJECT},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in specs]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            return ToolPlan("required", specs, structured=StructuredOutput("json", as_json_text(schema)))
        return ToolPlan(tool_choice, specs if tool_choice == "auto" else [])
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str) or (tool_choice.get("type") not in (None, "function")):
        raise APIError(400, 'tool_choice must be none, auto, required or {"type": "function", "function": {"name": ...}}',
                       param="tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools", param="tool_choice")
    params = specs[names.index(name)]["function"].get("parameters") or ANY_OBJECT
    return ToolPlan("named", specs, named=name, structured=StructuredOutput("json", as_json_text(params)))


def calls_from_required(text: str) -> list[ParsedCall]:
    """The calls of a ``required`` output (a JSON array of {"name", "parameters"}); [] if it did not
    complete (the request ran out of tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [ParsedCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in value
            if isinstance(c, dict) and isinstance(c.get("name"), str)]


def template_uses_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template if isinstance(template, str) else True


def render_history(messages: list[dict[str, Any]], tools: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    """``messages`` (role, content, and ``tool_calls`` / ``tool_call_id`` as OpenAI sends them) for the
    chat template. ``native``: the template handles tools itself (its ``tool_calls`` get their
    arguments as objects, as HF templates expect); otherwise calls and results become text and the
    tools a system section."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            m = dict(m)
            if calls:
                m["tool_calls"] = [_native_call(c) for c in calls]
            out.append(m)
            continue
        if m["role"] == "assistant" and calls:
            blocks = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                             "arguments": _arguments(c["function"].get("arguments"))},
                                                            ensure_ascii=False) + "\n</tool_call>" for c in calls)
            text = (m.get("content") or "")
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + blocks})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools and not native:
        section = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn.get("name"), "arguments": _arguments(fn.get("arguments"))}}
