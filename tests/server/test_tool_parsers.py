"""The Hermes tool-call parser, whole and streamed in pieces of every size."""

from __future__ import annotations

import json

import pytest

from server.api.tool_parsers import HermesToolParser

P = HermesToolParser()
TWO = ('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
       '<tool_call>{"name": "b", "arguments": {"s": "<tool_call>?"}}</tool_call>')


def test_whole_output():
    content, calls = P.parse(TWO)
    assert content == "Sure.\n\n" and [c.name for c in calls] == ["a", "b"]
    assert json.loads(calls[1].arguments) == {"s": "<tool_call>?"}
    assert P.parse("just text") == ("just text", [])
    content, calls = P.parse('<tool_call>{"name": "a", "arguments": {}}')  # EOS before the closing tag
    assert content is None and calls[0].name == "a"
    bad = "x <tool_call>not json</tool_call> y"
    assert P.parse(bad) == (bad, [])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_give_the_same_result(size):
    stream = P.streamer()
    content, calls = "", []
    pieces = [TWO[i:i + size] for i in range(0, len(TWO), size)]
    for i, piece in enumerate(pieces):
        out, new = stream.feed(piece, final=i == len(pieces) - 1)
        content += out
        calls += new
        assert "<tool" not in out  # a tag's start is held back, never sent as content
    assert content == "Sure.\n\n" and [c.name for c in calls] == ["a", "b"]


def test_stream_holds_back_only_a_possible_tag():
    stream = P.streamer()
    assert stream.feed("a <to") == ("a ", [])
    assert stream.feed("y> b") == ("<toy> b", [])
    assert stream.feed("<tool_call>{broken", final=True) == ("<tool_call>{broken", [])
