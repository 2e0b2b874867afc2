"""Paged attention on the GPU: a Triton kernel that reads each row's keys/values from the cache blocks
in place (no gather), split across programs along the context for long sequences.

Semantics are those of ``paged_attention_torch`` (the reference, same signature):

    for each row n (a query token of sequence row_seq[n], context length c = ctx_lens[n]):
        allowed positions j: max(0, c - window) <= j < c        (window None: 0 <= j < c)
        out[rows[n], h] = softmax_j(scale * q[rows[n], h] . K[j, h // G]) @ V[j, h // G]

q / out [T, H, D]; k_cache / v_cache [num_blocks, BS, Hkv, D]; G = H / Hkv query heads share a KV
head (GQA). Decode tokens are rows with c = position + 1; a prefill chunk that continues a sequence
(its own keys/values already written to the cache) is rows with c = position + 1 each, so the same
kernel serves both without gathering the context.

Grid: (rows, Hkv, partitions). A program takes one row, the G query heads of one KV head and one
partition of PARTITION tokens of its context, and keeps an online softmax over its blocks (fp32
accumulation whatever the cache dtype). With one partition the program writes ``out`` directly;
with more (long contexts, few rows: flash-decoding) each writes its partial output, max and sum,
and a second kernel combines them. fp16, bf16 and fp32 caches. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes 16-bit dots wrongly (numpy has no bf16): there every dot is fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    rows_ptr, row_seq_ptr, ctx_ptr, bt_ptr,
    scale, window, num_parts,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCKS_PER_PART: tl.constexpr, SPLIT: tl.constexpr, FP32_DOT: tl.constexpr,
):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    row = tl.load(rows_ptr + n)
    seq = tl.load(row_seq_ptr + n)
    ctx = tl.load(ctx_ptr + n)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    first_block = lo // BS + part * BLOCKS_PER_PART
    last_block = tl.minimum(first_block + BLOCKS_PER_PART, (ctx + BS - 1) // BS)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BS)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
    q = q * scale

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for b in range(first_block, last_block):
        block = tl.load(bt_ptr + seq * stride_bt + b).to(tl.int64)
        pos = b * BS + offs_s
        ok = (pos < ctx) & (pos >= lo)
        kv_off = block * stride_kb + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BS, D]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # [G, BS]
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no allowed position yet keeps m = -inf: avoid (-inf) - (-inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        base = (n * tl.num_programs(1) + kvh) * num_parts + part
        tl.store(part_max_ptr + base * BLOCK_G + offs_g, m_i)
        tl.store(part_sum_ptr + base * BLOCK_G + offs_g, l_i)
        tl.store(part_out_ptr + (base * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :], acc)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, rows_ptr, num_parts,
    stride_ot, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + n)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    base = (n * tl.num_programs(1) + kvh) * num_parts
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    for p in range(num_parts):
        m = tl.maximum(m, tl.load(part_max_ptr + (base + p) * BLOCK_G + offs_g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for p in range(num_parts):
        w = tl.exp(tl.load(part_max_ptr + (base + p) * BLOCK_G + offs_g) - m_safe)
        total += w * tl.load(part_sum_ptr + (base + p) * BLOCK_G + offs_g)
        acc += w[:, None] * tl.load(part_out_ptr + ((base + p) * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :])
    o = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    heads = kvh * G + offs_g
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=(offs_g < G)[:, None] & (offs_d < D)[None, :])


def num_partitions(max_ctx: int, block_size: int, num_rows: int, num_kv_heads: int, partition_blocks: int) -> int:
    """How many programs share one row's context: split only when the grid is too small to fill the
    GPU (few rows) and the context spans more than one partition."""
    blocks = -(-max_ctx // block_size)
    parts = -(-blocks // partition_blocks)
    if parts <= 1 or num_rows * num_kv_heads >= 256:
        return 1
    return parts


def paged_attention_triton(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           rows: torch.Tensor, row_seq: torch.Tensor, ctx_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, window: int | None,
                           max_ctx: int | None = None, partition_blocks: int | None = None) -> None:
    """Fill ``out[rows]`` (see the module docstring; the arguments are ``paged_attention_torch``'s).

    ``max_ctx`` (known on the host, e.g. ``PagedAttentionMetadata.decode_max_ctx``) sizes the split
    without a device sync; without it the context is not split. ``partition_blocks``: blocks per
    partition (default: 512 tokens' worth)."""
    n = rows.numel()
    if n == 0:
        return
    _, bs, hkv, d = k_cache.shape
    h = q.shape[1]
    g = h // hkv
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert bs & (bs - 1) == 0 and bs >= 16, "block size must be a power of two >= 16"
    block_g = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    block_d = max(16, triton.next_power_of_2(d))
    part_blocks = partition_blocks or max(1, 512 // bs)
    parts = num_partitions(max_ctx, bs, n, hkv, part_blocks) if max_ctx else 1
    if not max_ctx:  # unknown length: one partition holding every block of the table
        part_blocks = block_tables.shape[1]
    rows, row_seq, ctx_lens = rows.contiguous(), row_seq.contiguous(), ctx_lens.contiguous()
    bt = block_tables.contiguous()
    fp32_dot = _INTERPRETED or k_cache.dtype == torch.float32
    if parts > 1:
        part_out = torch.empty((n, hkv, parts, block_g, block_d), device=q.device, dtype=torch.float32)
        part_max = torch.empty((n, hkv, parts, block_g), device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # unused
    _paged_attention_kernel[(n, hkv, parts)](
        q, k_cache, v_cache, out, part_out, part_max, part_sum, rows, row_seq, ctx_lens, bt,
        float(scale), int(window or 0), parts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
        G=g, D=d, BS=bs, BLOCK_G=block_g, BLOCK_D=block_d, BLOCKS_PER_PART=part_blocks, SPLIT=parts > 1,
        FP32_DOT=fp32_dot,
    )
    if parts > 1:
        _combine_kernel[(n, hkv)](out, part_out, part_max, part_sum, rows, parts, out.stride(0), out.stride(1),
                                  G=g, D=d, BLOCK_G=block_g, BLOCK_D=block_d)
