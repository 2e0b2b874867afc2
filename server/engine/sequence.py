"""A Sequence: one request's tokens, its place in the KV cache and its output state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .protocol import GenerationRequest, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FORK_PENDING = "fork_pending"  # a choice of an n > 1 request, waiting for its parent's prompt
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    ``token_ids`` is prompt + generated output; ``num_computed_tokens`` how many of them already
    have keys/values in the cache (the next step computes the rest, in chunks for a long prefill);
    ``block_table`` the cache blocks holding them, in order. A preempted sequence drops its blocks
    and ``num_computed_tokens`` goes back to 0 (recomputed later, outputs kept).

    A request with ``n`` > 1 is one sequence per choice (``index`` 0..n-1): choice 0 computes the
    prompt; the others wait in ``forks`` (status FORK_PENDING) and are forked from it when its
    prompt is done, sharing its blocks and sampling from the same logits.
    """

    request: GenerationRequest
    index: int = 0
    adapter_handle: Any = None
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # prefix caching (block_manager.py): what the blocks' hashes depend on besides the tokens (the bank
    # and its version), the hashes of the full blocks so far, how many of the table's blocks are registered
    cache_key: tuple | None = ()  # None: never share blocks (an adapter handle without a cache key)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0  # tokens taken from the prefix cache instead of computed (over the lifetime)
    forks: list["Sequence"] = field(default_factory=list)
    # prompt log-probabilities across the prefix cache: the final hidden state at the last position of
    # each block this sequence computed (for the block's cache record), and that of the cached position
    # before the first computed one, whose row scores the first computed token
    block_end_hidden: dict[int, Any] = field(default_factory=dict)
    pending_prompt_hidden: Any = None
    status: SequenceStatus = SequenceStatus.WAITING
    # output state (the detokenizer / stop matcher are owned by the engine's output processing)
    detokenizer: Any = None
    stop_matcher: Any = None
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # filled chunk by chunk when requested
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)  # and the top k, when logprobs = k > 0
    grammar: Any = None  # structured outputs: the llguidance matcher, advanced by every sampled token
    # images: what embeds them and their embeddings once made (server.multimodal.embedder.SequenceImages,
    # kept for the sequence's lifetime: a preempted sequence recomputes its KV, not its images), None
    # for a text prompt; mm_spans: their placeholder spans with the cache keys the prefix cache mixes in
    images: Any = None
    mm_spans: tuple = ()
    fault: str | None = None  # set by the model runner when this step's logits were not finite: the engine ends it
    # timing
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    _prompt_tensor: tuple | None = field(default=None, repr=False)  # prompt_tensor's (device, tensor)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def bank(self) -> str | None:
        return self.request.bank

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    def prompt_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The prompt's token ids as a long tensor on ``device``, built once (the prompt never changes):
        the sampler's repetition penalty reads them every step, which as a list costs a long prompt
        milliseconds of Python a step."""
        cached = self._prompt_tensor
        if cached is None or cached[0] != device:
            cached = self._prompt_tensor = (device, torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device))
        return cached[1]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_s.append(now - self.last_token_time)
        self.last_token_time = now
