"""Runs one scheduled step: builds the flat batch and its metadata once, runs the model, samples.

Per step (never per layer): input ids, positions, each token's cache slot, the block tables, the
decode rows / prefill chunks for attention, the rows whose logits are wanted, the adapter step
(token -> bank) from the provider, and the rows fed precomputed embeddings (images' placeholder
spans, from the visual embedder). The per-token work is tensor ops; Python loops only over the
scheduled sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from server.model import LlamaModel, StepContext, step_context

from .cuda_graphs import DecodeGraphRunner, capture_sizes
from .kv_cache import KVCache
from .paged_attention import PagedAttentionMetadata, PagedAttentionStep, PrefillChunk, select_backend
from .sampler import Sampler, SamplerOutput, SamplingBatch
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, eos_token_ids: tuple[int, ...], visual: Any = None):
        self.model = model
        self.visual = visual  # server.multimodal.VisualEmbedder for a model with a vision tower
        self.cache = cache
        self.device = model.device
        self.eos_token_ids = tuple(eos_token_ids)
        self.backend = select_backend(cache)
        self.sampler = Sampler()
        self.packed_weights = model.pack_weights()  # CPU fp32: oneDNN-blocked copies for the GEMMs
        # prefix caching: keep the hidden state at each block end of prompts scored with log-probabilities
        self.capture_block_ends = False
        self.graphs: DecodeGraphRunner | None = None  # decode steps through CUDA graphs (``enable_graphs``)

    def enable_graphs(self, max_batch: int, max_model_len: int, capture: bool = True) -> DecodeGraphRunner:
        """Run plain decode steps of up to ``max_batch`` sequences through ``DecodeGraphRunner``
        (captured on CUDA when ``capture``; eager through the same static buffers elsewhere)."""
        self.graphs = DecodeGraphRunner(self.model, self.cache, self.backend, batch_sizes=capture_sizes(max_batch),
                                        max_blocks=-(-max_model_len // self.cache.block_size))
        if capture:
            self.graphs.capture()
        return self.graphs

    def _graph_covers(self, seqs: list[Sequence], num_tokens: list[int], adapters: Any) -> bool:
        """Whether this step may run through ``self.graphs``: every row one decode token, no factor
        bank, no prompt row that is an image's or scores log-probabilities, at most the largest size."""
        g = self.graphs
        banks_ok = adapters is None or (hasattr(adapters, "share_records") and not adapters.factors)
        return (g is not None and banks_ok and len(seqs) <= g.max_batch and all(k == 1 for k in num_tokens)
                and not any((s.params.prompt_logprobs or s.mm_spans) and s.num_computed_tokens < s.num_prompt_tokens
                            for s in seqs)
                and all(len(s.block_table) <= g.max_blocks for s in seqs))

    def build_attention(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[torch.Tensor, PagedAttentionMetadata]:
        """positions [T] and the step's paged attention metadata (see ``PagedAttentionMetadata``)."""
        dev, bs = self.device, self.cache.block_size
        starts = [s.num_computed_tokens for s in seqs]
        n = torch.tensor(num_tokens, dtype=torch.long)
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), n)  # [T]
        first_row = n.cumsum(0) - n  # [S] flat row of each chunk's first token
        positions = torch.arange(int(n.sum())) - first_row[seq_of_token] + torch.tensor(starts)[seq_of_token]
        max_blocks = max(len(s.block_table) for s in seqs)
        block_tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs],
                                    dtype=torch.long)
        slots = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        decode = [i for i, k in enumerate(num_tokens) if k == 1]
        prefills = [PrefillChunk(int(first_row[i]), k, starts[i], i) for i, k in enumerate(num_tokens) if k > 1]
        decode_idx = torch.tensor(decode, dtype=torch.long)
        decode_rows = first_row[decode_idx]
        decode_ctx = positions[decode_rows] + 1
        meta = PagedAttentionMetadata(
            slot_mapping=slots.to(dev), block_tables=block_tables.to(dev), decode_rows=decode_rows.to(dev),
            decode_seq=decode_idx.to(dev), decode_ctx_lens=decode_ctx.to(dev), prefills=prefills,
            decode_max_ctx=int(decode_ctx.max()) if decode else 0,
        )
        if self.backend == "triton":  # decode rows + every token of the chunks that continue a sequence
            cont = [c for c in prefills if c.context_start > 0]
            rows = torch.cat([decode_rows] + [torch.arange(c.start, c.start + c.num_tokens) for c in cont])
            seq = torch.cat([decode_idx] + [torch.full((c.num_tokens,), c.seq) for c in cont])
            meta.paged_rows, meta.paged_seq = rows.to(dev), seq.to(dev)
            ctx = positions[rows] + 1
            meta.paged_ctx_lens = ctx.to(dev)
            meta.paged_max_ctx = int(ctx.max()) if rows.numel() else 0
        return positions.to(dev), meta

    @staticmethod
    def _prompt_logprob_rows(seqs: list[Sequence], num_tokens: list[int]):
        """(rows, target token ids, [(sequence, count)]) of this step's prompt positions whose next
        token is a prompt token, for sequences that asked for prompt log-probabilities; None if none.
        A row is a flat row index, or the hidden state [hidden] of the cached position just before a
        sequence's first computed one (prefix caching: ``Sequence.pending_prompt_hidden``).
        Positions already recorded (a preempted sequence recomputing its prompt) are skipped."""
        rows: list[int | torch.Tensor] = []
        targets: list[int] = []
        owners: list[tuple[Sequence, int]] = []
        start = 0
        for seq, k in zip(seqs, num_tokens):
            if seq.params.prompt_logprobs:
                c, count = seq.num_computed_tokens, 0
                if seq.pending_prompt_hidden is not None and len(seq.prompt_logprobs) == c - 1 < seq.num_prompt_tokens - 1:
                    rows.append(seq.pending_prompt_hidden)
                    targets.append(seq.token_ids[c])
                    count = 1
                first = max(c, len(seq.prompt_logprobs))
                last = min(c + k, seq.num_prompt_tokens - 1)  # exclusive
                if last > first:
                    rows.extend(range(start + first - c, start + last - c))
                    targets.extend(seq.token_ids[first + 1:last + 1])
                    count += last - first
                if count:
                    owners.append((seq, count))
            start += k
        return (rows, targets, owners) if rows else None

    def _block_end_rows(self, seqs: list[Sequence], num_tokens: list[int]) -> list[tuple[Sequence, int, int]]:
        """(sequence, block index, flat row) of each prompt block end computed this step by a sequence
        scoring its prompt, whose hidden state its block's cache record keeps."""
        if not self.capture_block_ends:
            return []
        bs, out, start = self.cache.block_size, [], 0
        for seq, k in zip(seqs, num_tokens):
            if seq.params.prompt_logprobs and seq.cache_key is not None:
                c = seq.num_computed_tokens
                for p in range(c + (-(c + 1)) % bs, min(c + k, seq.num_prompt_tokens - 1), bs):
                    out.append((seq, p // bs, start + p - c))
            start += k
        return out

    @staticmethod
    def _record_prompt_logprobs(logits: torch.Tensor, num_sampling: int, prompt_rows) -> torch.Tensor:
        """Append each prompt row's log p(next prompt token) to its sequence (and, for a sequence that
        asked for k > 0 logprobs, the row's k most likely tokens); the sampling rows' logits."""
        _, targets, owners = prompt_rows
        extra = logits[num_sampling:].float()
        tgt = torch.tensor(targets, dtype=torch.long, device=extra.device)
        lse = torch.logsumexp(extra, dim=-1)
        lp = (extra.gather(1, tgt[:, None]).squeeze(1) - lse).tolist()
        k = max(seq.params.logprobs or 0 for seq, _ in owners)
        top_ids = top_lp = None
        if k:
            top_v, top_i = extra.topk(min(k, extra.shape[1]), dim=-1)
            top_lp, top_ids = (top_v - lse[:, None]).tolist(), top_i.tolist()
        at = 0
        for seq, n in owners:
            seq.prompt_logprobs.extend(lp[at:at + n])
            kk = seq.params.logprobs or 0
            if kk and top_ids is not None:
                seq.prompt_top.extend(list(zip(ids[:kk], vals[:kk])) for ids, vals in zip(top_ids[at:at + n], top_lp[at:at + n]))
            at += n
        return logits[:num_sampling]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, adapters: Any = None) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run the model over ``batch``; return the sequences that reached their end (in batch order) and
        their sampled tokens. Sequences whose prefill chunk stops short of their end sample nothing.
        A sequence finishing its prompt with choices waiting to fork (``Sequence.forks``) is followed
        by them: each samples its first token from the same logits."""
        seqs, num_tokens = batch.seqs, batch.num_tokens
        ids = [t for s, k in zip(seqs, num_tokens) for t in s.token_ids[s.num_computed_tokens:s.num_computed_tokens + k]]
        sample_idx = [i for i, (s, k) in enumerate(zip(seqs, num_tokens)) if s.num_computed_tokens + k == len(s)]
        if self._graph_covers(seqs, num_tokens, adapters):
            logits = self.graphs.run(ids, [s.num_computed_tokens for s in seqs], [s.block_table for s in seqs], adapters)
            if len(sample_idx) < len(seqs):
                logits = logits[torch.tensor(sample_idx, dtype=torch.long, device=logits.device)]
            return self._sample([seqs[i] for i in sample_idx], logits)
        positions, meta = self.build_attention(seqs, num_tokens)
        ends = torch.tensor(num_tokens, dtype=torch.long).cumsum(0) - 1
        logits_indices = ends[torch.tensor(sample_idx, dtype=torch.long)]
        prompt_rows = self._prompt_logprob_rows(seqs, num_tokens)
        stored = []  # hidden states of cached positions, rows T, T+1, ... after the step's own
        if prompt_rows is not None:
            flat = []
            for r in prompt_rows[0]:
                if isinstance(r, torch.Tensor):
                    stored.append(r)
                    r = len(ids) + len(stored) - 1
                flat.append(r)
            logits_indices = torch.cat([logits_indices, torch.tensor(flat, dtype=torch.long)])
        logits_indices = logits_indices.to(self.device)
        captures = self._block_end_rows(seqs, num_tokens)
        input_embeds = self.visual.step_inputs(seqs, num_tokens) if self.visual is not None else None
        ctx = StepContext(positions=positions,
                          attention=PagedAttentionStep(self.cache, meta, self.backend, self.model.config.sliding_window),
                          adapters=adapters, logits_indices=logits_indices, input_embeds=input_embeds)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        with step_context(ctx):
            if stored or captures:  # the model's forward, in its two halves, to read and add hidden states
                hidden = self.model.hidden_states(input_ids)
                for seq, j, row in captures:
                    seq.block_end_hidden[j] = hidden[row].clone()
                if stored:
                    hidden = torch.cat([hidden, torch.stack(stored).to(hidden.dtype)])
                logits = self.model.lm_head(hidden.index_select(0, logits_indices))
            else:
                logits = self.model(input_ids)
        if prompt_rows is not None:
            for seq, _ in prompt_rows[2]:
                seq.pending_prompt_hidden = None
            logits = self._record_prompt_logprobs(logits, len(sample_idx), prompt_rows)
        return self._sample([seqs[i] for i in sample_idx], logits)

    def _sample(self, sampling: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], SamplerOutput | None]:
        """Sample the next token of each of ``sampling`` (and its forks) from its row of ``logits``."""
        if not sampling:
            return [], None
        if any(s.forks for s in sampling):
            rows = [j for j, s in enumerate(sampling) for _ in range(1 + len(s.forks))]
            sampling = [c for s in sampling for c in (s, *s.forks)]
            logits = logits[torch.tensor(rows, device=logits.device)]
        # a NaN row must never sample a token. A NaN or infinite logit makes its row's sum non-finite, and
        # a row sum is one pass (elementwise isfinite over [rows, vocab] cost ~5 ms a 32-row step on the
        # CPU); a finite row whose sum overflows (logits ~1e34) is then checked element by element.
        finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
        if not bool(finite.all()):  # one host sync per step
            suspect = (~finite).nonzero().flatten()
            finite[suspect] = torch.isfinite(logits[suspect]).all(dim=-1)
            for i in (~finite).nonzero().flatten().tolist():
                where = f" with bank {sampling[i].bank!r}" if sampling[i].bank else ""
                sampling[i].fault = f"the model produced NaN or infinite logits for this request{where}"
        # prompts only for the rows that read them (the repetition penalty), as each sequence's cached tensor
        prompts = [s.prompt_tensor(self.device) if s.params.repetition_penalty != 1.0 else () for s in sampling]
        sbatch = SamplingBatch.build([s.params for s in sampling], prompts,
                                     [s.output_token_ids for s in sampling], [s.generator for s in sampling],
                                     self.device, eos_token_ids=self.eos_token_ids,
                                     matchers=[s.grammar for s in sampling] if any(s.grammar is not None for s in sampling) else None,
                                     vocab_size=logits.shape[-1])
        return sampling, self.sampler(logits.float(), sbatch)
