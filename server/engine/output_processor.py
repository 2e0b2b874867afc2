"""Turns each newly sampled token into the request's stream: text, stop checks, finish reason.

Per sequence it keeps an ``IncrementalDetokenizer`` (text that never ends in a partial character)
and, when the request has stop strings, a ``StopStringMatcher`` (text that could still become a
stop string is held back; the stop string itself is not returned unless asked). A request with a
structured output advances its grammar matcher by each token; the sequence stops when the grammar
is complete.
"""

from __future__ import annotations

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .protocol import GenerationEvent, TokenLogprob, Usage
from .sequence import Sequence


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        """Prepare a newly added sequence's detokenizer and stop matcher."""
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        if seq.params.stop:
            seq.stop_matcher = StopStringMatcher(seq.params.stop, seq.params.include_stop_str_in_output)

    def on_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> GenerationEvent:
        """Append ``token_id`` to ``seq`` and return its event (``finished`` set when it ends here)."""
        p = seq.params
        seq.append_token(token_id)
        n_out = seq.num_output_tokens
        finish, stopped = None, False
        if seq.grammar is not None and not seq.grammar.is_stopped():
            if not seq.grammar.consume_token(token_id):  # the mask allows only what it accepts: a bug if seen
                event = GenerationEvent(request_id=seq.request_id, token_ids=[token_id])
                return self.finish(seq, event, "error", f"structured output: {seq.grammar.get_error()}")
        if n_out >= p.min_tokens and ((token_id in self.eos_token_ids and not p.ignore_eos)
                                      or token_id in p.stop_token_ids):
            finish = "stop"
            text = ""  # the stopping token is returned as an id, never as text
        else:
            text = seq.detokenizer.add(token_id)
            if seq.stop_matcher is not None:
                text, stopped = seq.stop_matcher.feed(text)  # the stop string and what follows are dropped
                if stopped:
                    finish = "stop"
        if finish is None and seq.grammar is not None and seq.grammar.is_stopped():
            finish = "stop"  # the grammar admits no further token: the output is complete
        if finish is None and (n_out >= p.max_tokens or len(seq) >= self.max_model_len):
            finish = "length"
        if finish is not None and seq.stop_matcher is not None and not stopped:
            text += seq.stop_matcher.flush()  # held back as a possible stop string's start: it was not
        event = GenerationEvent(request_id=seq.request_id, index=seq.index, text=text, token_ids=[token_id],
                                logprobs=[logprob] if logprob is not None else None)
        if finish is not None:
            self.finish(seq, event, finish)
        return event

    @staticmethod
    def finish(seq: Sequence, event: GenerationEvent, reason: str, error: str | None = None) -> GenerationEvent:
        event.finished = True
        event.finish_reason = reason
        event.error = error
        event.usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens)
        return event
