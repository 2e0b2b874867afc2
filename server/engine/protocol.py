"""The engine's public interface: what the HTTP layer submits and what comes back.

Request objects flow in (``GenerationRequest`` with ``SamplingParams``), events flow out
(``GenerationEvent``), and the engine reports statistics to a ``StatsSink`` once per step and once
per finished request (the metrics layer implements the sink; nothing in the model calls it).
Adapters reach the engine only through ``AdapterProvider``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_LOGPROBS = 20


class EngineError(Exception):
    """Base class of errors the HTTP layer turns into an OpenAI-style error body."""

    status = 500
    type = "server_error"
    param: str | None = None  # the request field at fault, when there is one (the API's ``param``)
    code: str | None = None

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(EngineError):
    status = 400
    type = "invalid_request_error"


class UnknownBank(EngineError):
    status = 404
    type = "not_found_error"


class EngineOverloaded(EngineError):
    """The waiting queue is full: the client should retry later (HTTP 429 with Retry-After)."""

    status = 429
    type = "rate_limit_error"


class EngineStopped(EngineError):
    """The engine is shutting down or not running (HTTP 503)."""

    status = 503
    type = "service_unavailable"


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output (engine/structured_output.py), hashable: the grammar cache's key.

    ``kind``: "json" (``spec`` a JSON schema as canonical JSON text), "regex" (a pattern), "choice"
    (a JSON list of strings: the output is exactly one of them) or "grammar" (Lark or GBNF text).
    """

    kind: str
    spec: str


@dataclass
class SamplingParams:
    """Sampling for one request, as vLLM offers it. Validated by ``validate``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus k top alternatives
    prompt_logprobs: bool = False  # log p(prompt token i+1 | tokens <= i) for every prompt token after the first
    # (with ``logprobs`` = k > 0, also the k most likely tokens at each of those positions)
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # the output must match it (token masks in the sampler)
    # token id -> value added to its logit before penalties and sampling (OpenAI's logit_bias; the API
    # clamps values to [-100, 100]); the raw logprobs do not see it
    logit_bias: dict[int, float] | None = None
    # the sampler's tensors of logit_bias, built on first use (sampler._bias_tensors)
    _bias_tensors: Any = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        def bad(msg: str, param: str) -> InvalidRequest:
            return InvalidRequest(msg, param=param)

        if self.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise bad(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise bad("presence_penalty and frequency_penalty must be in [-2, 2]",
                      "presence_penalty" if not -2 <= self.presence_penalty <= 2 else "frequency_penalty")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        for token, value in (self.logit_bias or {}).items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad(f"logit_bias keys must be token ids (non-negative integers), got {token!r}", "logit_bias")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"logit_bias values must be finite numbers, got {value!r} for token {token}", "logit_bias")


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    bank: str | None = None  # a bank's name; None: the base model
    n: int = 1  # independent choices sampled from the prompt, computed once (choice j seeded seed + j)
    arrival_time: float = field(default_factory=time.monotonic)
    # images in the prompt (server.multimodal.ImageInput), in prompt order; each occupies its
    # placeholder span of prompt_token_ids
    images: list[Any] = field(default_factory=list)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    """One increment of a request's output. The last event has ``finished`` set.

    ``text`` is the newly decoded text since the previous event (never a partial UTF-8 character,
    never a held-back prefix of a stop string); ``token_ids`` / ``logprobs`` the new tokens.
    ``finish_reason``: "stop" (EOS, stop token or stop string), "length", "abort" or "error"
    (then ``error`` says why). ``index`` is the choice (0..n-1) of a request with ``n`` > 1; each
    choice ends with its own finished event.
    """

    request_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float] | None = None  # on the first event when requested: len(prompt) - 1 values
    prompt_top: list[list[tuple[int, float]]] | None = None  # with them, when logprobs = k > 0: k (id, logprob) each
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None


@dataclass
class StepStats:
    """One engine step, reported after it ran."""

    time: float
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preempted: int = 0
    prefix_cache_queries: int = 0  # tokens of sequences admitted this step that were looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found (their KV blocks reused, not computed)
    running_banks: tuple[str, ...] = ()
    waiting_banks: tuple[str, ...] = ()
    routing: Any = None  # adapter routing statistics of this step (see the adapter runtime)


@dataclass
class RequestStats:
    """One finished request."""

    request_id: str
    bank: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queue_time_s: float  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    e2e_s: float
    inter_token_s: list[float] = field(default_factory=list)


class StatsSink(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, stats: RequestStats) -> None: ...


class AdapterProvider(Protocol):
    """How the engine reaches expert banks (implemented by the bank registry).

    ``acquire`` is called when a request is admitted (it pins the bank's current version for the
    request's lifetime, raising ``UnknownBank``); ``release`` when it finishes or is aborted.
    ``build_step`` is called once per step with each scheduled sequence's handle (None: base
    model) and its number of tokens in the flat batch, in batch order; it returns the step's
    ``AdapterStep`` for ``StepContext.adapters`` (None when no sequence has a bank).
    """

    def acquire(self, bank: str) -> Any: ...

    def release(self, handle: Any) -> None: ...

    def build_step(self, handles: list[Any], num_tokens: list[int]) -> Any: ...
