"""Token sampling for one engine step, vectorised over the batch, with vLLM's semantics.

Per row ``i`` (one scheduled sequence, ``params[i]``), on its logits ``[V]``, in this order:

0. ``logit_bias``: each listed token's value added to its logit (OpenAI's; vLLM applies it before the
   penalties too);
1. penalties: repetition (over prompt + output tokens, HF/vLLM style: a seen token's logit is divided
   by the penalty when positive and multiplied by it otherwise), then frequency and presence (over
   output tokens only): ``l -= frequency * count + presence * (count > 0)``;
2. structured outputs: tokens the row's grammar does not allow next get ``-inf`` (its bitmask,
   filled for all constrained rows at once, ``structured_output.py``);
   ``min_tokens``: while fewer than ``min_tokens`` tokens were generated, EOS (unless ``ignore_eos``,
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

from dataclasses import dataclass, field

import torch

from server.engine.protocol import SamplingParams, TokenLogprob

from .structured_output import apply_bitmask, fill_bitmask

# Temperatures below this are greedy: dividing logits by them overflows fp32 (vLLM's _SAMPLING_EPS).
_GREEDY_EPS = 1e-5


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator a seeded request samples with (it must live on the logits' device)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _flat_pairs(rows: list[int], parts_per_row: list[tuple], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs ``[N]`` for every token of the given rows, for index_put_. Each row's
    tokens come in parts (lists, or long tensors: a sequence's cached ``prompt_tensor``, so a long
    prompt is not re-read in Python every step)."""
    tensors, lens = [], []
    for parts in parts_per_row:
        n = 0
        for part in parts:
            if len(part):
                tensors.append(torch.as_tensor(part, dtype=torch.long, device=device))
                n += len(part)
        lens.append(n)
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=device),
                                      torch.tensor(lens, dtype=torch.long, device=device))
    return row_idx, (torch.cat(tensors) if tensors else torch.empty(0, dtype=torch.long, device=device))


def _bias_tensors(params: SamplingParams, vocab: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A request's ``logit_bias`` as (token ids [K] long, values [K] float32) on ``device``, or (None, a
    dense [vocab] vector) when it lists more than a sixteenth of the vocabulary; built once per request
    and kept on its params, so a bias of thousands of tokens costs a step one small op for its row."""
    cached = params._bias_tensors
    if cached is None or cached[1].device != device or (cached[0] is None and cached[1].numel() != vocab):
        toks = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
        if 16 * len(toks) > vocab:
            cached = (None, torch.zeros(vocab, dtype=torch.float32, device=device).index_put_((toks,), vals))
        else:
            cached = (toks, vals)
        params._bias_tensors = cached
    return cached


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
    logit_bias: list[tuple[int, SamplingParams]] = field(default_factory=list)  # rows with a logit_bias
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)  # sampled rows only
    any_unseeded_sampled: bool = False
    logprob_rows: torch.Tensor | None = None  # [R] long: rows that asked for logprobs
    logprob_ks: list[int] = field(default_factory=list)  # [R] number of alternatives per such row
    # Sampled rows with some truncation (top_k, top_p or min_p), [T] long; None: no such row.
    trunc_rows: torch.Tensor | None = None
    # The other sampled rows [F] long, set only when trunc_rows is (else every row takes the full path).
    full_rows: torch.Tensor | None = None
    candidates: torch.Tensor | None = None  # [B] long: each row's candidate count (see ``sample``)
    # Structured outputs: the constrained rows [G] long (None: all rows) and their bitmask [G, ceil(V/32)].
    grammar_rows: torch.Tensor | None = None
    grammar_bitmask: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              generators: list[torch.Generator | None], device, *,
              eos_token_ids: list[int] | tuple[int, ...] = (), matchers: list | None = None,
              vocab_size: int = 0) -> "SamplingBatch":
        """``params``, ``prompt_ids``, ``output_ids``, ``generators``: one entry per row, batch order.

        ``output_ids[i]`` are the tokens row ``i`` generated so far (its penalties and min_tokens read
        them); ``prompt_ids[i]`` (a list or a long tensor) only the repetition penalty reads;
        ``eos_token_ids`` are the model's EOS ids, masked with ``stop_token_ids`` by min_tokens.
        ``matchers``: each row's grammar matcher (None: unconstrained), with the logits' ``vocab_size``.
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

        bias = [(i, p) for i, p in enumerate(params) if p.logit_bias]

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        trunc = [i for i in sampled if top_k[i] or top_p[i] < 1.0 or min_p[i] > 0.0]
        full = [i for i in sampled if not (top_k[i] or top_p[i] < 1.0 or min_p[i] > 0.0)] if trunc else []
        seeded = [(i, generators[i]) for i in sampled if generators[i] is not None]
        grammar_rows = [i for i, m in enumerate(matchers or ()) if m is not None]
        grammar_bitmask = fill_bitmask([matchers[i] for i in grammar_rows], vocab_size) if grammar_rows else None

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
            seen_pairs=(_flat_pairs(rep_rows, [(prompt_ids[i], output_ids[i]) for i in rep_rows], device)
                        if rep_rows else None),
            frequency_penalty=column([[p.frequency_penalty] for p in params]) if freq_rows else None,
            presence_penalty=column([[p.presence_penalty] for p in params]) if freq_rows else None,
            output_pairs=_flat_pairs(freq_rows, [(output_ids[i],) for i in freq_rows], device) if freq_rows else None,
            banned_pairs=(_flat_pairs(banned_rows, [(ids,) for ids in banned_ids], device)
                          if any(banned_ids) else None),
            logit_bias=bias,
            seeded=seeded,
            any_unseeded_sampled=len(seeded) < len(sampled),
            logprob_rows=column(logprob_rows, torch.long) if logprob_rows else None,
            logprob_ks=[params[i].logprobs for i in logprob_rows],
            trunc_rows=column(trunc, torch.long) if trunc else None,
            full_rows=column(full, torch.long) if full else None,
            candidates=column([max(_CANDIDATES, k + 1) for k in top_k], torch.long) if trunc else None,
            grammar_rows=(column(grammar_rows, torch.long) if grammar_rows and len(grammar_rows) < n else None),
            grammar_bitmask=grammar_bitmask,
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

        if batch.logit_bias:
            logits = logits.clone()
            for row, params in batch.logit_bias:
                toks, vals = _bias_tensors(params, logits.shape[1], logits.device)
                if toks is None:
                    logits[row] += vals
                else:
                    logits[row].index_add_(0, toks, vals)
        logits = apply_penalties(logits, batch)
        if batch.grammar_bitmask is not None:
            logits = apply_bitmask(logits, batch.grammar_rows, batch.grammar_bitmask)
        if batch.banned_pairs is not None:
            logits = logits.index_put(batch.banned_pairs, torch.tensor(float("-inf"), device=logits.device))

        if batch.all_greedy:
            tokens = fast_argmax(logits)
        else:
            greedy_tokens = fast_argmax(logits) if batch.greedy is not None else None
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


_ARGMAX_BLOCK = 256


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``x [B, V]`` (the first index of the maximum), ~4x faster on CPU.

    ATen's argmax is a scalar loop; ``amax`` is vectorised. So: each block of ``_ARGMAX_BLOCK``
    tokens' maximum (one vectorised pass), the first block holding the row's maximum, the first
    index of it inside that block. NaN behaves as in argmax (it is the maximum of its block).
    """
    B, V = x.shape
    if V % _ARGMAX_BLOCK or V <= _ARGMAX_BLOCK or not x.is_contiguous():
        return x.argmax(dim=-1)
    blocks = x.view(B, V // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    block = blocks.amax(dim=-1).argmax(dim=-1)  # [B]
    inner = blocks[torch.arange(B, device=x.device), block]  # [B, BLK]
    return block * _ARGMAX_BLOCK + inner.argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties on ``logits [B, V]`` (out of place).

    Only the seen tokens' logits change: they are gathered at flat indices ``row * V + token``,
    penalised and written back into one copy of the logits (duplicate indices write equal values),
    so the cost is one copy plus O(number of history tokens), with no [B, V] count or mask buffers.
    Frequency is ``index_put_(accumulate=True)`` of ``-frequency`` once per occurrence.
    """
    if batch.repetition_penalty is None and batch.frequency_penalty is None:
        return logits
    B, V = logits.shape
    out = logits.clone()
    flat = out.view(-1)
    if batch.repetition_penalty is not None:
        rows, toks = batch.seen_pairs
        idx = rows * V + toks
        vals = flat.index_select(0, idx)
        pen = batch.repetition_penalty.view(-1).index_select(0, rows)
        flat.index_put_((idx,), torch.where(vals > 0, vals / pen, vals * pen))
    if batch.frequency_penalty is not None:
        rows, toks = batch.output_pairs
        idx = rows * V + toks
        vals = flat.index_select(0, idx)
        flat.index_put_((idx,), vals - batch.presence_penalty.view(-1).index_select(0, rows))
        flat.index_put_((idx,), -batch.frequency_penalty.view(-1).index_select(0, rows), accumulate=True)
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_k_max: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's ``top_k [B]`` largest logits (0: all), then its nucleus of mass ``top_p [B]``.

    Masked logits become ``-inf``. The nucleus is the most probable tokens (renormalised over the
    top-k survivors) up to and including the first one whose cumulative mass reaches ``top_p``: a
    token is kept when the mass of the tokens above it is below ``top_p`` (vLLM's rule; the most
    probable token always survives). Tokens tied at a threshold value all survive.

    No full sort unless needed: top-k alone is one ``topk`` of the batch's largest k, and top-p looks
    at each row's ``_NUCLEUS_CANDIDATES`` most likely tokens first; when some row's nucleus is larger
    than that, top-p alone places each row's nucleus by a histogram of its mass
    (``_top_p_by_histogram``), and with top-k it sorts the whole vocabulary (a full sort of
    [B, 49152] is ~20x a topk on CPU).
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
        if top_k is None or not bool((top_k > 0).any()):
            masked = _top_p_by_histogram(logits, top_p)
            if masked is not None:
                return masked
    return _top_k_top_p_by_sort(logits, top_k, top_p)


# Bins of logit value (below each row's maximum) that ``_top_p_by_histogram`` sums the mass in.
_NUCLEUS_BINS = 2048


def _top_p_by_histogram(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """``apply_top_k_top_p`` without top-k, for rows whose nucleus is large, without sorting the vocabulary.

    Each row's probability mass is summed into ``_NUCLEUS_BINS`` equal bins of logit value below its
    maximum (one ``scatter_add_``); the cumulative mass over the bins finds the bin holding the nucleus's
    last token, and only that bin's tokens are ordered (a ``topk`` of its largest count) to place it
    exactly: a token is kept when the mass above it is below ``top_p``, as in the sort. So the kept set
    is the sort's, up to the rounding of the cumulative sums (summed per bin here, token by token there).
    A flat row (a nucleus of ~13,000 of 49,152 tokens) costs about a fifth of the sort. None (the caller
    sorts) when a row's maximum is not finite.
    """
    neg_inf = float("-inf")
    m = logits.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        return None
    e = (logits - m).exp_()
    z = e.sum(dim=-1, keepdim=True)
    probs = e.div_(z)
    lo = logits.masked_fill(logits == neg_inf, float("inf")).amin(dim=-1, keepdim=True)
    width = ((m - lo) / _NUCLEUS_BINS).clamp_(min=torch.finfo(logits.dtype).tiny)
    # bin 0 holds the maximum; -inf logits (no mass) land in the last bin
    bins = (m - logits).div_(width).clamp_(max=_NUCLEUS_BINS - 1).long()
    mass = torch.zeros(logits.shape[0], _NUCLEUS_BINS, dtype=probs.dtype, device=logits.device)
    cum = mass.scatter_add_(1, bins, probs).cumsum_(dim=-1)
    p = top_p.unsqueeze(1)
    edge = (cum < p).sum(dim=-1, keepdim=True).clamp_(max=_NUCLEUS_BINS - 1)  # the bin where the mass reaches p
    before = cum.gather(1, (edge - 1).clamp_(min=0)).masked_fill_(edge == 0, 0.0)
    in_edge = (bins == edge) & (p < 1)  # (rows keeping everything need no edge)
    vals = logits.masked_fill(~in_edge, neg_inf).topk(int(in_edge.sum(dim=-1).max()), dim=-1).values
    pv = (vals - m).exp_().div_(z)
    keep = (before + pv.cumsum(dim=-1) - pv < p) & (vals > neg_inf)
    threshold = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    threshold = threshold.masked_fill(p >= 1, neg_inf)
    return logits.masked_fill(logits < threshold, neg_inf)


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


# Each truncated row (top_k, top_p or min_p) first looks at its ``max(_CANDIDATES, top_k + 1)`` most
# likely tokens; only a row whose kept set may extend past them goes through the full-vocabulary path.
# Per row, so that a seeded row takes the same path (and token) whatever else is in its batch.
_CANDIDATES = 64


def _uniforms(batch: SamplingBatch, device) -> torch.Tensor:
    """One uniform number per row ``[B, 1]`` fp64; a seeded row draws its own with its generator."""
    B = batch.num_rows
    if batch.any_unseeded_sampled:
        u = torch.rand(B, 1, dtype=torch.float64, device=device)
    else:  # greedy rows' draws are discarded by the caller
        u = torch.zeros(B, 1, dtype=torch.float64, device=device)
    if batch.seeded:
        rows = torch.tensor([r for r, _ in batch.seeded], device=device)
        u[rows] = torch.stack([torch.rand(1, dtype=torch.float64, device=device, generator=g)
                               for _, g in batch.seeded])
    return u


def _rows(x, rows: torch.Tensor | None):
    if x is None or isinstance(x, float) or rows is None:
        return x
    return x.index_select(0, rows)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Scale ``logits [B, V]`` (after penalties) by temperature, truncate, draw one token per row -> ``[B]``.

    Rows without truncation: ``softmax(logits / T)`` and ``draw``. Truncated rows: one ``topk`` of the
    batch's candidate count, truncation and the draw among each row's own candidates (``[B, C]``
    work, no full-vocabulary softmax); rows whose kept set may not fit there fall back to
    ``_sample_full`` (``apply_top_k_top_p``, then min_p on the probabilities).
    """
    B, V = logits.shape
    u = _uniforms(batch, logits.device)
    if batch.trunc_rows is None:
        return draw(_scaled_probs(logits, batch.temperature), batch, u)
    tokens = torch.zeros(B, dtype=torch.long, device=logits.device)
    if batch.full_rows is not None:  # sampled rows without truncation
        r = batch.full_rows
        probs = _scaled_probs(logits.index_select(0, r), _rows(batch.temperature, r))
        tokens[r] = draw(probs, batch, u.index_select(0, r))
    r = batch.trunc_rows
    all_rows = len(r) == B
    sel = None if all_rows else r
    x = logits if all_rows else logits.index_select(0, r)
    cand_tokens, spill = _sample_candidates(
        x, _rows(batch.temperature, sel), _rows(batch.top_k, sel), batch.top_k_max, _rows(batch.top_p, sel),
        _rows(batch.min_p, sel), _rows(batch.candidates, sel), u if all_rows else u.index_select(0, r))
    if spill is not None:
        s = spill.nonzero().squeeze(1)
        sp_u = (u if all_rows else u.index_select(0, r)).index_select(0, s)
        full = _sample_full(x.index_select(0, s), _rows(_rows(batch.temperature, sel), s),
                            _rows(_rows(batch.top_k, sel), s), batch.top_k_max,
                            _rows(_rows(batch.top_p, sel), s), _rows(_rows(batch.min_p, sel), s), batch, sp_u)
        cand_tokens[s] = full
    if all_rows:
        return cand_tokens
    tokens[r] = cand_tokens
    return tokens


def _scaled_probs(logits: torch.Tensor, temperature) -> torch.Tensor:
    if temperature is not None:
        logits = logits / temperature
    return logits.softmax(dim=-1)


def _sample_full(x, temperature, top_k, top_k_max, top_p, min_p, batch, u) -> torch.Tensor:
    """The full-vocabulary path for truncated rows (``x [R, V]`` unscaled)."""
    if temperature is not None:
        x = x / temperature
    if top_k is not None or top_p is not None:
        if top_k is not None and not bool((top_k > 0).any()):
            top_k = None
        if top_p is not None and not bool((top_p < 1).any()):
            top_p = None
        if top_k is not None or top_p is not None:
            x = apply_top_k_top_p(x, top_k, top_k_max if top_k is not None else 0, top_p)
    probs = x.softmax(dim=-1)
    if min_p is not None:
        # Unnormalised after the mask, which the inverse CDF does not need.
        top = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * top, 0.0)
    return draw(probs, batch, u)


def _sample_candidates(x, temperature, top_k, top_k_max, top_p, min_p, cand, u):
    """Truncation and the draw among each row's most likely tokens, for ``x [R, V]`` (unscaled).

    Returns ``(tokens [R], spill)``: ``spill [R] bool`` (or None) marks rows whose kept set may extend
    past their ``cand`` candidates; their tokens are to be replaced by the full path's.

    Same kept set as ``apply_top_k_top_p`` then min_p: top-k keeps every token ``>=`` the k-th largest
    (ties included), top-p renormalises over the top-k survivors (over the vocabulary without top-k)
    and keeps a token while the mass above it is below top_p, min_p keeps ``p >= min_p * p_max``.
    """
    R, V = x.shape
    C = min(V, max(_CANDIDATES, top_k_max + 1))
    neg_inf = float("-inf")
    cand = cand.clamp(max=C)
    vals, idx = x.topk(C, dim=-1)  # descending; temperature keeps the order
    s = vals if temperature is None else vals / temperature  # [R, C] scaled logits
    pos = torch.arange(C, device=x.device)
    keep = (pos < cand.unsqueeze(1)) & (s > neg_inf)
    has_k = None
    if top_k is not None:
        has_k = (top_k > 0).unsqueeze(1)
        kth = vals.gather(1, (top_k.clamp(min=1, max=C) - 1).unsqueeze(1))
        keep &= ~has_k | (vals >= kth)
    rel = (s - s[:, :1]).exp_()  # p / p_max, exactly 1 for the first candidate
    if top_p is not None:
        p = top_p.unsqueeze(1)
        needs_p = p < 1
        w = rel.masked_fill(~keep, 0.0)
        # Normaliser: the top-k survivors' mass (among the candidates), else the whole vocabulary's.
        z = w.sum(dim=-1, keepdim=True)
        no_k = needs_p if has_k is None else needs_p & ~has_k
        if bool(no_k.any()):
            if bool(no_k.all()):  # (no copy of the rows)
                scale = 1.0 if temperature is None else temperature
                z = (x - vals[:, :1]).div_(scale).exp_().sum(dim=-1, keepdim=True)
            else:
                nk = no_k.squeeze(1).nonzero().squeeze(1)
                xs = x.index_select(0, nk)
                scale = 1.0 if temperature is None else (temperature if isinstance(temperature, float)
                                                          else temperature.index_select(0, nk))
                zs = (xs - vals.index_select(0, nk)[:, :1]).div_(scale).exp_().sum(dim=-1, keepdim=True)
                z = z.index_put((nk,), zs)
        probs = w / z
        mass_above = probs.cumsum(dim=-1) - probs
        keep &= (mass_above < p) | ~needs_p
    if min_p is not None:
        keep &= rel >= min_p.unsqueeze(1)
    spill = None
    if C < V:
        last = keep.gather(1, (cand - 1).unsqueeze(1))
        if bool(last.any()):
            spill = last.squeeze(1)
    w = rel.masked_fill(~keep, 0.0).double()
    cdf = w.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=C - 1)
    # Rounding can land past the last kept candidate: take the last one of nonzero weight.
    last_nz = (w > 0).int().mul_(pos.int() + 1).argmax(dim=-1, keepdim=True)
    j = torch.minimum(j, last_nz)
    return idx.gather(1, j).squeeze(1), spill


def draw(probs: torch.Tensor, batch: SamplingBatch, u: torch.Tensor | None = None) -> torch.Tensor:
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
    if u is None:  # ``u [B, 1]``: the rows' uniform numbers (``_uniforms``)
        u = _uniforms(batch, device)

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
