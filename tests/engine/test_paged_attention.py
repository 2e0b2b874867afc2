"""Paged attention (C++ kernel and torch reference) equals plain causal attention over the same context."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import KVCache
from server.engine.paged_attention import (PagedAttentionMetadata, PagedAttentionStep, PrefillChunk,
                                           paged_attention_torch)
from server.engine.paged_attention_cpu import load_library, paged_attention_cpu
from server.model import ModelConfig, causal_attention


def _cfg(heads=4, kv_heads=2, head_dim=16):
    return ModelConfig.from_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": heads * head_dim,
                                  "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": heads,
                                  "num_key_value_heads": kv_heads, "head_dim": head_dim})


def _filled_cache(cfg, lens, bs, gen):
    """A cache holding random K/V for sequences of ``lens`` tokens in shuffled blocks."""
    need = [-(-n // bs) for n in lens]
    cache = KVCache(cfg, sum(need) + 3, bs, torch.device("cpu"), torch.float32)
    perm = torch.randperm(cache.num_blocks, generator=gen).tolist()
    tables, ks, vs = [], [], []
    for n, nb in zip(lens, need):
        table, perm = perm[:nb], perm[nb:]
        k = torch.randn(n, cfg.num_key_value_heads, cfg.head_dim, generator=gen)
        v = torch.randn(n, cfg.num_key_value_heads, cfg.head_dim, generator=gen)
        for p in range(n):
            cache.k[0, table[p // bs], p % bs] = k[p]
            cache.v[0, table[p // bs], p % bs] = v[p]
        tables.append(table)
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return cache, bt, ks, vs


@pytest.mark.parametrize("heads,kv_heads,window,head_dim", [
    (4, 2, None, 16), (4, 4, None, 16), (6, 2, 5, 16), (9, 3, None, 16),
    (9, 3, None, 64), (4, 1, 37, 8), (18, 2, None, 16),  # 64-wide heads; one 8-lane column; G > 8
    (4, 2, None, 12)])  # head_dim not a multiple of 8: the scalar path
@pytest.mark.parametrize("backend", ["cpu_kernel", "torch"])
def test_decode_rows_match_causal_attention(heads, kv_heads, window, head_dim, backend):
    if backend == "cpu_kernel" and load_library() is None:
        pytest.skip("C++ kernel unavailable")
    gen = torch.Generator().manual_seed(0)
    cfg = _cfg(heads, kv_heads, head_dim)
    # 64-wide heads: long contexts and enough rows that the kernel gives each thread whole rows
    lens = [1, 7, 16, 33, 50] if head_dim != 64 else [1, 9, 130, 257, 64, 3, 17, 40, 8, 100, 2, 71]
    cache, bt, ks, vs = _filled_cache(cfg, lens, 8, gen)
    t = len(lens) + 3
    q = torch.randn(t, heads, cfg.head_dim, generator=gen)
    rows = torch.randperm(t, generator=gen)[:len(lens)]  # rows of the flat batch, any order
    ctx = torch.tensor(lens)
    out = torch.full_like(q, 7.0)
    fn = paged_attention_torch if backend == "torch" else (lambda *a: paged_attention_cpu(load_library(), *a))
    fn(q, out, cache.k[0], cache.v[0], rows, torch.arange(len(lens)), ctx, bt, cfg.head_dim ** -0.5, window)
    for i, r in enumerate(rows.tolist()):
        ref = causal_attention(q[r:r + 1], ks[i], vs[i], lens[i] - 1, window)
        torch.testing.assert_close(out[r:r + 1], ref, atol=1e-5, rtol=1e-5)
    untouched = sorted(set(range(t)) - set(rows.tolist()))
    assert (out[untouched] == 7.0).all()


def test_step_writes_cache_and_serves_chunked_prefill():
    """A continued prefill chunk attends over its cached prefix plus itself; its K/V land in the cache."""
    gen = torch.Generator().manual_seed(1)
    cfg = _cfg()
    cache, bt, ks, vs = _filled_cache(cfg, [12], 4, gen)
    # the sequence grows by 6 tokens (positions 12..17): give it two more blocks
    free = sorted(set(range(cache.num_blocks)) - set(bt[0].tolist()))
    table = bt[0].tolist() + free[:2]
    new_k = torch.randn(6, 2, 16, generator=gen)
    new_v = torch.randn(6, 2, 16, generator=gen)
    q = torch.randn(6, 4, 16, generator=gen)
    pos = torch.arange(12, 18)
    bts = torch.tensor([table])
    slots = bts[0, pos // 4] * 4 + pos % 4
    meta = PagedAttentionMetadata(slot_mapping=slots, block_tables=bts, decode_rows=torch.tensor([], dtype=torch.long),
                                  decode_seq=torch.tensor([], dtype=torch.long),
                                  decode_ctx_lens=torch.tensor([], dtype=torch.long),
                                  prefills=[PrefillChunk(0, 6, 12, 0)])
    out = PagedAttentionStep(cache, meta, "torch", None).forward(0, q, new_k, new_v)
    ref = causal_attention(q, torch.cat([ks[0], new_k]), torch.cat([vs[0], new_v]), 12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[0].flatten(0, 1)[slots], new_k)
