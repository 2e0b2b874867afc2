"""Token sampling for one engine step, vectorised over the batch, with vLLM's semantics.

Per row ``i`` (one scheduled sequence, ``params[i]``), on its logits ``[V]``, in this order:

1. penalties: repetition (over prompt + output tokens, HF/vLLM style: a seen token's logit is divided
   by the penalty when positive and multiplied by it otherwise), then frequency and presence (over
   output tokens only): ``l -= frequency * count + presence * (count > 0)``;
2. ``min_tokens``: while fewer than ``min_tokens`` tokens were generated, EOS (unless ``ignore_eos``,
   where EOS stops nothing) and ``stop_token_ids`` get ``-inf``;
3. temperature: ``0`` (below ``_GREEDY_EPS``) is greedy, the argmax of the logits after 1-2;
4. top_k, top_p (nucleus over the top-k survivors), min_p (drop tokens with probability below
   ``min_p`` times the most probable one's);
5. sampling by inverse CDF, one uniform number per row. A row with a generator draws its number
   with it alone, so a seeded request's tokens do not depend on the batch it is in or its row in it.

Logprobs (rows with ``params.logprobs`` set) come from ``log_softmax`` of the **raw** model logits,
before penalties, temperature and truncation: vLLM's default ``raw_logprobs`` mode. They describe
the model's distribution, which stays comparable across requests with different sampling settings.

``SamplingBatch.build`` does the per-step Python work once (and marks which stages any row needs);
``Sampler.__call__`` runs only the needed stages as batched tensor ops: the all-greedy step without
penalties is one ``argmax``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from server.engine.protocol import SamplingParams, TokenLogprob

# Temperatures below this are greedy: dividing logits by them overflows fp32 (vLLM's _SAMPLING_EPS).
_GREEDY_EPS = 1e-5


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator a seeded request samples with (it must live on the logits' device)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _flat_pairs(rows: list[int], ids_per_row: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs ``[N]`` for every token of the given rows, for index_put_."""
    row_idx = list(itertools.chain.from_iterable([r] * len(ids) for r, ids in zip(rows, ids_per_row)))
    tok_idx = list(itertools.chain.from_iterable(ids_per_row))
    return (torch.tensor(row_idx, dtype=torch.long, device=device),
            torch.tensor(tok_idx, dtype=torch.long, device=device))


@dataclass
class SamplingBatch:
    """One step's sampling settings as tensors on the logits' device, built by ``build``.

    A stage's fields are None when no row of the batch needs it, so the sampler skips that stage.
    Rows are in batch order: row ``i`` of the logits belongs to ``params[i]``.
    """

    num_rows: int
    device: torch.device
    greedy: torch.Tensor | None  # [B] bool; None: no row is greedy
    all_greedy: bool
    # [B, 1] (greedy rows hold 1), a float when every sampled row shares it, None when that is 1.
    temperature: torch.Tensor | float | None
    top_k: torch.Tensor | None  # [B] long, 0: off for that row
    top_k_max: int
    top_p: torch.Tensor | None  # [B] float, 1: off
    min_p: torch.Tensor | None  # [B] float, 0: off
    repetition_penalty: torch.Tensor | None  # [B, 1]
    seen_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (row, token) over prompt + output
    frequency_penalty: torch.Tensor | None  # [B, 1]; set with presence_penalty
    presence_penalty: torch.Tensor | None  # [B, 1]
    output_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (row, token) over output tokens
    banned_pairs: tuple[torch.Tensor, torch.Tensor] | None  # (row, token) masked by min_tokens
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)  # sampled rows only
    any_unseeded_sampled: bool = False
    logprob_rows: torch.Tensor | None = None  # [R] long: rows that asked for logprobs
    logprob_ks: list[int] = field(default_factory=list)  # [R] number of alternatives per such row

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              generators: list[torch.Generator | None], device, *,
              eos_token_ids: list[int] | tuple[int, ...] = ()) -> "SamplingBatch":
        """``params``, ``prompt_ids``, ``output_ids``, ``generators``: one entry per row, batch order.

        ``output_ids[i]`` are the tokens row ``i`` generated so far (its penalties and min_tokens read
        them); ``eos_token_ids`` are the model's EOS ids, masked with ``stop_token_ids`` by min_tokens.
        """
        n = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")
        device = torch.device(device)

        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.temperature < _GREEDY_EPS for p in params]
        sampled = [i for i in range(n) if not greedy[i]]
        all_greedy = not sampled

        temperature = None
        temps = {params[i].temperature for i in sampled}
        if len(temps) == 1 and 1.0 not in temps:
            temperature = temps.pop()
        elif len(temps) > 1:
            temperature = column([[1.0 if greedy[i] else params[i].temperature] for i in range(n)])

        # Truncation only matters for sampled rows (the argmax survives all of it).
        top_k = [0 if greedy[i] or params[i].top_k <= 0 else params[i].top_k for i in range(n)]
        top_p = [1.0 if greedy[i] else params[i].top_p for i in range(n)]
        min_p = [0.0 if greedy[i] else params[i].min_p for i in range(n)]

        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        freq_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]

        banned_rows, banned_ids = [], []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                banned_rows.append(i)
                banned_ids.append(sorted(stop_ids))

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        seeded = [(i, generators[i]) for i in sampled if generators[i] is not None]

        return cls(
            num_rows=n,
            device=device,
            greedy=column(greedy, torch.bool) if any(greedy) and not all_greedy else None,
            all_greedy=all_greedy,
            temperature=temperature,
            top_k=column(top_k, torch.long) if any(top_k) else None,
            top_k_max=max(top_k, default=0),
            top_p=column(top_p) if any(p < 1.0 for p in top_p) else None,
            min_p=column(min_p) if any(p > 0.0 for p in min_p) else None,
            repetition_penalty=(column([[p.repetition_penalty] for p in params]) if rep_rows else None),
            seen_pairs=(_flat_pairs(rep_rows, [prompt_ids[i] + output_ids[i] for i in rep_rows], device)
                        if rep_rows else None),
            frequency_penalty=column([[p.frequency_penalty] for p in params]) if freq_rows else None,
            presence_penalty=column([[p.presence_penalty] for p in params]) if freq_rows else None,
            output_pairs=_flat_pairs(freq_rows, [output_ids[i] for i in freq_rows], device) if freq_rows else None,
            banned_pairs=(_flat_pairs(banned_rows, banned_ids, device)
                          if any(banned_ids) else None),
            seeded=seeded,
            any_unseeded_sampled=len(seeded) < len(sampled),
            logprob_rows=column(logprob_rows, torch.long) if logprob_rows else None,
            logprob_ks=[params[i].logprobs for i in logprob_rows],
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B] the sampled token of each row
    logprobs: list[TokenLogprob | None]  # [B] None for rows that did not ask


class Sampler:
    """``sampler(logits [B, V] fp32, batch) -> SamplerOutput``; the input logits are not modified."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [{batch.num_rows}, V], got {tuple(logits.shape)}")
        logits = logits.float()
        raw_logprobs = None
        if batch.logprob_rows is not None:  # from the raw logits: computed before any stage below
            # (rows are sorted, so all rows asking means rows == arange(B))
            rows = batch.logprob_rows
            raw_logprobs = (logits if len(rows) == batch.num_rows else logits.index_select(0, rows)).log_softmax(dim=-1)

        logits = apply_penalties(logits, batch)
        if batch.banned_pairs is not None:
            logits = logits.index_put(batch.banned_pairs, torch.tensor(float("-inf"), device=logits.device))

        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            greedy_tokens = logits.argmax(dim=-1) if batch.greedy is not None else None
            if batch.temperature is not None:
                logits = logits / batch.temperature
            tokens = sample(logits, batch)
            if greedy_tokens is not None:
                tokens = torch.where(batch.greedy, greedy_tokens, tokens)

        token_ids = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * batch.num_rows
        if raw_logprobs is not None:
            rows = batch.logprob_rows
            chosen = raw_logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
            k_max = max(batch.logprob_ks)
            top_vals, top_ids = (raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None))
            top_vals = top_vals.tolist() if k_max else None
            top_ids = top_ids.tolist() if k_max else None
            for j, (row, k) in enumerate(zip(rows.tolist(), batch.logprob_ks)):
                top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
                logprobs[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen[j], top=top)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties on ``logits [B, V]`` (out of place)."""
    B, V = logits.shape
    if batch.repetition_penalty is not None:
        seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
        seen[batch.seen_pairs] = True
        penalty = torch.where(seen, batch.repetition_penalty, 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if batch.frequency_penalty is not None:
        rows, toks = batch.output_pairs
        counts = torch.zeros(B, V, dtype=logits.dtype, device=logits.device)
        counts.index_put_((rows, toks), torch.ones_like(toks, dtype=logits.dtype), accumulate=True)
        logits = logits - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_k_max: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's ``top_k [B]`` largest logits (0: all), then its nucleus of mass ``top_p [B]``.

    Masked logits become ``-inf``. The nucleus is the most probable tokens (renormalised over the
    top-k survivors) up to and including the first one whose cumulative mass reaches ``top_p``: a
    token is kept when the mass of the tokens above it is below ``top_p`` (vLLM's rule; the most
    probable token always survives). Tokens tied at a threshold value all survive.

    No full sort unless needed: top-k alone is one ``topk`` of the batch's largest k, and top-p looks
    at each row's ``_NUCLEUS_CANDIDATES`` most likely tokens first, sorting the whole vocabulary only
    when some row's nucleus is larger than that (a full sort of [B, 49152] is ~20x a topk on CPU).
    """
    B, V = logits.shape
    neg_inf = float("-inf")
    if top_p is None:
        k = top_k.clamp(max=V)
        kth = logits.topk(min(top_k_max, V), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = kth.masked_fill((k == 0).unsqueeze(1), neg_inf)
        return logits.masked_fill(logits < kth, neg_inf)
    candidates = max(_NUCLEUS_CANDIDATES, top_k_max)
    if candidates < V:
        masked = _top_k_top_p_by_topk(logits, top_k, top_p, candidates)
        if masked is not None:
            return masked
    return _top_k_top_p_by_sort(logits, top_k, top_p)


# How many of a row's most likely tokens top-p examines before it falls back to a full sort.
_NUCLEUS_CANDIDATES = 256


def _top_k_top_p_by_sort(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """``apply_top_k_top_p`` by sorting each row ascending (vLLM's formulation)."""
    B, V = logits.shape
    neg_inf = float("-inf")
    sorted_logits, order = logits.sort(dim=-1)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = sorted_logits.gather(1, (V - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _top_k_top_p_by_topk(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor,
                         candidates: int) -> torch.Tensor | None:
    """``apply_top_k_top_p`` from each row's ``candidates`` largest logits; None when some row's
    nucleus may extend past them (then the caller sorts)."""
    neg_inf = float("-inf")
    vals, _ = logits.topk(candidates, dim=-1)  # [B, C] descending
    p = top_p.unsqueeze(1)
    unrestricted = p >= 1  # [B, 1] rows that keep everything top-k keeps
    if top_k is not None:
        has_k = (top_k > 0).unsqueeze(1)
        kth = vals.gather(1, (top_k.clamp(min=1, max=candidates) - 1).unsqueeze(1))
        vals = vals.masked_fill(has_k & (vals < kth), neg_inf)
        # Top-k rows renormalise over their survivors (all among the candidates); others over V.
        lse = torch.where(has_k, vals.logsumexp(dim=-1, keepdim=True), logits.logsumexp(dim=-1, keepdim=True))
        unrestricted = unrestricted & ~has_k
    else:
        lse = logits.logsumexp(dim=-1, keepdim=True)
    probs = (vals - lse).exp()
    mass_above = probs.cumsum(dim=-1) - probs
    keep = ((mass_above < p) | (p >= 1)) & (vals > neg_inf)
    # A top-k row's survivors are all candidates; another row keeping its last candidate may need more.
    spills = keep[:, -1:] & ~unrestricted
    if top_k is not None:
        spills &= ~has_k
    if bool(spills.any()):
        return None
    threshold = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    threshold = threshold.masked_fill(unrestricted, neg_inf)
    return logits.masked_fill(logits < threshold, neg_inf)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Truncate ``logits [B, V]`` (already temperature-scaled) and draw one token per row -> ``[B]``."""
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_k_max, batch.top_p)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        # Unnormalised after the mask, which the inverse CDF below does not need.
        top = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < batch.min_p.unsqueeze(1) * top, 0.0)
    return draw(probs, batch)


def draw(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` (unnormalised, >= 0) by inverse CDF -> ``[B]``.

    One uniform number per row: a seeded row draws it with its own generator, so its token depends
    only on its own probabilities and generator. (An exponential race, ``argmax(p / Exp(1))``, needs
    V random numbers per row: on CPU that RNG costs more than the rest of the sampler.)

    The CDF is two-level, so that it is exact enough without an fp64 cumsum over the vocabulary (8x
    an fp32 one on CPU), while an fp32 cumsum would round away the tail's many small probabilities:
    fp32 sums of blocks of ``_CDF_BLOCK`` tokens, an fp64 CDF over the blocks picks the block, an
    fp64 CDF inside it the token. A token of probability 0 is never drawn.
    """
    B, V = probs.shape
    device = probs.device
    if batch.any_unseeded_sampled:
        u = torch.rand(B, 1, dtype=torch.float64, device=device)
    else:  # greedy rows' draws are discarded by the caller
        u = torch.zeros(B, 1, dtype=torch.float64, device=device)
    if batch.seeded:
        rows = torch.tensor([r for r, _ in batch.seeded], device=device)
        u[rows] = torch.stack([torch.rand(1, dtype=torch.float64, device=device, generator=g)
                               for _, g in batch.seeded])

    pad = -V % _CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(B, -1, _CDF_BLOCK)
    block_mass = blocks.sum(dim=-1).double()  # [B, NB]
    block_cdf = block_mass.cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [B, 1] < total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)  # [B, 1]
    # Where the target falls inside the block, as a fraction of its mass (robust to rounding).
    frac = (target - (block_cdf.gather(1, block) - block_mass.gather(1, block))) / block_mass.gather(1, block)
    inner = blocks.gather(1, block.unsqueeze(-1).expand(B, 1, _CDF_BLOCK)).squeeze(1)  # [B, BLK]
    inner_cdf = inner.double().cumsum(dim=-1)
    inner_target = frac.clamp(0, 1) * inner_cdf[:, -1:]
    token = torch.searchsorted(inner_cdf, inner_target, right=True)
    # Rounding can land the target on the block's end: take its last token of nonzero probability.
    last = (inner > 0).int().mul_(torch.arange(1, _CDF_BLOCK + 1, device=device, dtype=torch.int)).argmax(dim=-1, keepdim=True)
    token = torch.where(token >= _CDF_BLOCK, last, token)
    return (block * _CDF_BLOCK + token).squeeze(1).clamp_(max=V - 1)


_CDF_BLOCK = 256
