"""Streaming text out of generated tokens: incremental detokenization and stop-string matching.

``IncrementalDetokenizer`` turns one token at a time into the text it completes. It decodes a short
window of ids (vLLM's prefix/read offsets) instead of the whole sequence, which keeps each step cheap
and still gets right what a token-by-token decode gets wrong:

- a character split over several byte-level tokens (emoji, CJK) decodes to U+FFFD until its last
  byte arrives: that incomplete tail is held back, never emitted;
- tokenizers that drop a word's leading space at the start of a decode (SentencePiece's "▁") decode
  the new token after a few previous ones, so the space is kept.

``StopStringMatcher`` sits after it: it holds back any text that could still become a stop string.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first output token, for the leading-space context (vLLM's value).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """``add(token_id) -> str``: the text the token completes; ``flush()`` at the end of generation.

    Offsets into ``self._ids`` (the prompt's tail followed by the output): ``prefix`` starts the decode
    window; ``read`` ends the part whose text was already emitted in full when the window last moved.
    ``_emitted`` counts the characters of ``decode(ids[prefix:])`` already returned; it can run ahead
    of ``read`` when a token completes some characters and starts another one.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._emitted = len(self._decode(self._prefix, self._read))

    def _decode(self, start: int, end: int | None = None) -> str:
        if start == end:
            return ""
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._prefix)
        complete = len(text.rstrip(_REPLACEMENT))
        if complete < len(text):
            # The tail is an incomplete character (or invalid bytes: then it is emitted with the next
            # complete text, or by flush). Emit what is complete before it; keep the window.
            new, self._emitted = text[self._emitted:complete], max(self._emitted, complete)
            return new
        new = text[self._emitted:]
        # Everything decoded is emitted: slide the window so it stays a few tokens long.
        self._prefix, self._read = self._read, len(self._ids)
        self._emitted = len(self._decode(self._prefix, self._read))
        return new

    def flush(self) -> str:
        """Text held back at the end of generation: an incomplete character, as U+FFFD."""
        text = self._decode(self._prefix)
        new = text[self._emitted:]
        self._emitted = len(text)
        return new


class StopStringMatcher:
    """``feed(text) -> (text safe to emit, stopped)``; ``flush()`` when generation ends otherwise.

    Matches may span any number of ``feed`` calls. Text that could be the start of a stop string is
    held back until it either completes one or cannot anymore. When several stop strings match, the
    one that completes first in the stream wins (the earliest end; at equal ends the earliest start),
    so the result does not depend on how the text was split into ``feed`` calls. The stop string is
    dropped from the output unless ``include_stop_str_in_output``; nothing after it is emitted.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        # A match can only start inside ``buf``: text emitted earlier was not a prefix of any stop.
        best = None  # (end, start)
        for s in self.stop:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            end, start = best
            self.stopped = True
            self._held = ""
            return buf[:end] if self.include_stop_str_in_output else buf[:start], True
        hold = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
