"""Attention over the paged KV cache for one step's flat batch (the engine's ``AttentionStep``).

Built once per step from the scheduled sequences (``PagedAttentionMetadata``), then called by every
layer: it writes the step's new keys/values into their cache slots (one ``index_copy_``), then

- decode tokens (chunks of one token) attend over their sequence's cached blocks in one call for
  the whole batch: the C++ kernel on CPU (``paged_attention_cpu``), the Triton kernel on CUDA
  (``paged_attention_triton``: blocks read in place, long contexts split across programs), otherwise
  ``paged_attention_torch`` (gather the blocks in the batch's block tables, one masked SDPA);
- prefill chunks run one causal SDPA each over the chunk's own keys/values when they start the
  sequence; a chunk that continues one (chunked prefill, recompute) attends over its sequence's
  blocks: in the same Triton call as the decode rows on CUDA (each of its tokens a row with its own
  context length), else over the gathered blocks.

The backend is picked once, in ``select_backend``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model import causal_attention
from server.model.fused_decode import PagedDecode

from .kv_cache import KVCache
from .paged_attention_cpu import load_library, paged_attention_cpu


@dataclass
class PrefillChunk:
    """``num_tokens`` consecutive tokens of the flat batch from ``start``, at positions ``context_start``..
    of the sequence whose block table is row ``seq`` of ``block_tables``."""

    start: int
    num_tokens: int
    context_start: int
    seq: int


@dataclass
class PagedAttentionMetadata:
    """slot_mapping [T] int64: each token's flat cache slot.
    block_tables [S, max_blocks] int64: the step's sequences' block tables, padded with 0.
    decode_rows / decode_seq / decode_ctx_lens [N] int64: the single-token chunks: their row in the
        flat batch, their sequence's row in block_tables, and their context length (position + 1).
    prefills: the multi-token chunks.
    decode_max_ctx: the longest decode context (known on the host: no device sync per layer).
    paged_rows / paged_seq / paged_ctx_lens / paged_max_ctx: with the Triton backend, the decode rows
        followed by every token of the prefill chunks that continue a sequence (same meaning as the
        decode_* fields); those chunks then skip the gather path. None with the other backends.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    decode_rows: torch.Tensor
    decode_seq: torch.Tensor
    decode_ctx_lens: torch.Tensor
    prefills: list[PrefillChunk]
    decode_max_ctx: int = 0
    paged_rows: torch.Tensor | None = None
    paged_seq: torch.Tensor | None = None
    paged_ctx_lens: torch.Tensor | None = None
    paged_max_ctx: int = 0


def paged_attention_torch(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          rows: torch.Tensor, row_seq: torch.Tensor, ctx_lens: torch.Tensor,
                          block_tables: torch.Tensor, scale: float, window: int | None,
                          max_ctx: int | None = None) -> None:
    """Reference (and GPU first step): fill ``out[rows]``, q/out [T, H, D], caches [blocks, BS, Hkv, D].

    Each row attends positions [max(0, ctx - window), ctx) of its sequence, gathered from its blocks.
    """
    bs = k_cache.shape[1]
    used = -(-(max_ctx or int(ctx_lens.max())) // bs)
    bt = block_tables.index_select(0, row_seq)[:, :used]  # [N, used]
    n = bt.shape[0]
    k = k_cache[bt].flatten(1, 2).transpose(1, 2)  # [N, Hkv, used*BS, D]
    v = v_cache[bt].flatten(1, 2).transpose(1, 2)
    pos = torch.arange(used * bs, device=q.device)[None, :]
    allowed = pos < ctx_lens[:, None]
    if window:
        allowed &= pos >= ctx_lens[:, None] - window
    qs = q.index_select(0, rows)[:, :, None, :]  # [N, H, 1, D]
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=allowed[:, None, None, :], scale=scale,
                                       enable_gqa=k.shape[1] != qs.shape[1])
    out.index_copy_(0, rows, o.reshape(n, q.shape[1], q.shape[2]))


def select_backend(cache: KVCache) -> str:
    """"cpu_kernel" when the C++ kernel can serve this cache, "triton" on CUDA (block size a power of two
    >= 16; ``MOLESERVE_TRITON_ATTENTION=0`` turns it off), else "torch"."""
    if cache.k.device.type == "cpu" and cache.k.dtype == torch.float32 and load_library() is not None:
        return "cpu_kernel"
    bs = cache.block_size
    if (cache.k.device.type == "cuda" and bs >= 16 and bs & (bs - 1) == 0
            and os.environ.get("MOLESERVE_TRITON_ATTENTION", "1") != "0"):
        try:
            import server.engine.paged_attention_triton  # noqa: F401, PLC0415 - needs triton
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


class PagedAttentionStep:
    """``AttentionStep`` over a ``KVCache``, bound to one step's metadata."""

    def __init__(self, cache: KVCache, meta: PagedAttentionMetadata, backend: str, sliding_window: int | None):
        self.cache = cache
        self.meta = meta
        self.backend = backend
        self.window = sliding_window

    def paged_decode(self) -> PagedDecode | None:
        """The step as the fused decode forward (``server.model.fused_decode``) reads it, when every row
        is a decode row and the C++ kernel is the backend; None otherwise."""
        meta = self.meta
        if self.backend != "cpu_kernel" or meta.prefills or meta.paged_rows is not None:
            return None
        return PagedDecode(self.cache.k, self.cache.v, meta.slot_mapping, meta.decode_rows, meta.decode_seq,
                           meta.decode_ctx_lens, meta.block_tables, self.window)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        meta = self.meta
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
        vc.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        out = q.new_empty(q.shape)  # contiguous, as the kernel wants
        if meta.paged_rows is not None:
            from .paged_attention_triton import paged_attention_triton  # noqa: PLC0415

            paged_attention_triton(q, out, kc, vc, meta.paged_rows, meta.paged_seq, meta.paged_ctx_lens,
                                   meta.block_tables, d ** -0.5, self.window, meta.paged_max_ctx)
            for c in meta.prefills:
                if c.context_start == 0:
                    end = c.start + c.num_tokens
                    out[c.start:end] = causal_attention(q[c.start:end], k[c.start:end], v[c.start:end], 0, self.window)
            return out
        if meta.decode_rows.numel():
            scale = d ** -0.5
            if self.backend == "cpu_kernel":
                paged_attention_cpu(load_library(), q.contiguous(), out, kc, vc, meta.decode_rows, meta.decode_seq,
                                    meta.decode_ctx_lens, meta.block_tables, scale, self.window)
            else:
                paged_attention_torch(q, out, kc, vc, meta.decode_rows, meta.decode_seq, meta.decode_ctx_lens,
                                      meta.block_tables, scale, self.window, meta.decode_max_ctx)
        bs = self.cache.block_size
        for c in meta.prefills:
            end = c.start + c.num_tokens
            if c.context_start == 0:
                ks, vs = k[c.start:end], v[c.start:end]
            else:
                total = c.context_start + c.num_tokens
                blocks = meta.block_tables[c.seq, : -(-total // bs)]
                ks = kc[blocks].flatten(0, 1)[:total].to(q.dtype)
                vs = vc[blocks].flatten(0, 1)[:total].to(q.dtype)
            out[c.start:end] = causal_attention(q[c.start:end], ks, vs, c.context_start, self.window)
        return out
