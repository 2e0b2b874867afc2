"""Tool-call parsers: a model's raw output -> OpenAI ``tool_calls``, whole or streamed.

``hermes`` (Hermes 2 Pro, Qwen 2 / 2.5 / 3 and every model trained on their format): each call is
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; text outside the tags is the
message's content. A block that is not valid JSON of that shape stays in the content, as vLLM does.
``--tool-call-parser`` names the parser (``PARSERS``); ``none`` leaves the output as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_from_json(text: str) -> ParsedCall | None:
    """``{"name": ..., "arguments": {...}}`` (or ``"parameters"``) -> a call; None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        return ParsedCall(value["name"], args)
    return ParsedCall(value["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output. Content is the text outside the call blocks (None if
        only whitespace); a block that does not parse is kept in the content."""
        calls: list[ParsedCall] = []
        content: list[str] = []
        at = 0
        for m in self._block.finditer(text):
            call = call_from_json(m.group(1).strip())
            if call is None:
                continue
            content.append(text[at:m.start()])
            calls.append(call)
            at = m.end()
        content.append(text[at:])
        joined = "".join(content)
        return (joined if joined.strip() else None) if calls else (text or None), calls

    def streamer(self) -> "HermesStream":
        return HermesStream(self)


class HermesStream:
    """Incremental ``HermesToolParser``: ``feed(text)`` -> (content to send now, calls completed now);
    text that may be the start of a ``<tool_call>`` tag is held back until it is decided."""

    def __init__(self, parser: HermesToolParser):
        self.parser = parser
        self.buffer = ""
        self.in_call = False
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        out: list[str] = []
        calls: list[ParsedCall] = []
        start, end = self.parser.start, self.parser.end
        while True:
            if not self.in_call:
                at = self.buffer.find(start)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self.buffer, start)
                    out.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                out.append(self.buffer[:at])
                self.buffer = self.buffer[at + len(start):]
                self.in_call = True
            at = self.buffer.find(end)
            if at < 0 and not final:
                break
            body = self.buffer if at < 0 else self.buffer[:at]
            call = call_from_json(body.strip())
            if call is None:  # not a call after all: it was content
                out.append(start + body + ("" if at < 0 else end))
            else:
                calls.append(call)
                self.num_calls += 1
            self.buffer = "" if at < 0 else self.buffer[at + len(end):]
            self.in_call = False
            if at < 0:
                break
        return "".join(out), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


PARSERS = {"hermes": HermesToolParser}


def get_parser(name: str | None) -> HermesToolParser | None:
    return None if name in (None, "none") else PARSERS[name]()
