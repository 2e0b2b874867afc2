"""The Triton paged-attention kernel against ``paged_attention_torch`` (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from server.engine.paged_attention import paged_attention_torch

triton_ops = pytest.importorskip("server.engine.paged_attention_triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_seqs, heads, kv_heads, d, bs, ctx, dtype, seed=0, rows_per_seq=1):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // bs) for c in ctx) + 1
    num_blocks = num_seqs * max_blocks + 3
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=g).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=g)[: num_seqs * max_blocks]  # scattered blocks
    block_tables = perm.view(num_seqs, max_blocks).to(DEVICE)
    # rows: per sequence, its last ``rows_per_seq`` positions (decode: 1; a continuing prefill chunk: more)
    row_seq, ctx_lens = [], []
    for s, c in enumerate(ctx):
        for r in range(min(rows_per_seq, c)):
            row_seq.append(s)
            ctx_lens.append(c - r)
    t = len(row_seq) + 2
    q = torch.randn(t, heads, d, generator=g).to(DEVICE, dtype)
    rows = torch.arange(1, 1 + len(row_seq), device=DEVICE)  # not starting at 0: rows index q
    return q, k_cache, v_cache, rows, torch.tensor(row_seq, device=DEVICE), torch.tensor(ctx_lens, device=DEVICE), block_tables


@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 16), (8, 2, 32), (12, 4, 64), (6, 1, 24), (32, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_matches_reference(heads, kv_heads, d, dtype):
    if dtype != torch.float32 and d == 128 and DEVICE == "cpu":
        pytest.skip("large 16-bit case: the interpreter is slow")
    bs = 16
    q, kc, vc, rows, row_seq, ctx, bt = _case(3, heads, kv_heads, d, bs, [1, 37, 80], dtype)
    scale = d ** -0.5
    ref = torch.zeros_like(q, dtype=torch.float32)
    paged_attention_torch(q.float(), ref, kc.float(), vc.float(), rows, row_seq, ctx, bt, scale, None)
    out = torch.zeros_like(q)
    triton_ops.paged_attention_triton(q, out, kc, vc, rows, row_seq, ctx, bt, scale, None, max_ctx=80)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float()[rows], ref[rows], atol=tol, rtol=tol)
    assert (out[0] == 0).all() and (out[-1] == 0).all()  # rows not asked for are left alone


@pytest.mark.parametrize("window", [None, 5, 16, 40])
@pytest.mark.parametrize("partition_blocks", [1, 2, 64])
def test_split_context_and_sliding_window(window, partition_blocks):
    """Long contexts split across programs (flash-decoding) and combined; sliding windows."""
    bs, d = 16, 16
    q, kc, vc, rows, row_seq, ctx, bt = _case(2, 4, 2, d, bs, [150, 63], torch.float32, seed=1)
    ref = torch.zeros_like(q)
    paged_attention_torch(q, ref, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, window)
    out = torch.zeros_like(q)
    triton_ops.paged_attention_triton(q, out, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, window, max_ctx=150,
                                      partition_blocks=partition_blocks)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-4, rtol=1e-4)


def test_prefill_rows_over_cached_blocks():
    """A prefill chunk continuing a sequence: every chunk token is a row with its own context length."""
    bs, d = 16, 32
    q, kc, vc, rows, row_seq, ctx, bt = _case(2, 8, 2, d, bs, [70, 33], torch.float32, seed=2, rows_per_seq=20)
    ref = torch.zeros_like(q)
    paged_attention_torch(q, ref, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, None)
    out = torch.zeros_like(q)
    triton_ops.paged_attention_triton(q, out, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, None, max_ctx=70)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-4, rtol=1e-4)


def test_unknown_max_ctx_uses_one_partition():
    bs, d = 32, 16
    q, kc, vc, rows, row_seq, ctx, bt = _case(2, 2, 1, d, bs, [100, 5], torch.float32, seed=3)
    ref = torch.zeros_like(q)
    paged_attention_torch(q, ref, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, None)
    out = torch.zeros_like(q)
    triton_ops.paged_attention_triton(q, out, kc, vc, rows, row_seq, ctx, bt, d ** -0.5, None)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-4, rtol=1e-4)


def test_num_partitions_policy():
    assert triton_ops.num_partitions(100, 16, 1, 8, 32) == 1  # fits in one partition
    assert triton_ops.num_partitions(4096, 16, 1, 8, 32) == 8  # one long row: split
    assert triton_ops.num_partitions(4096, 16, 64, 8, 32) == 1  # the grid is already full


def test_engine_with_triton_backend_equals_reference(tiny_model_dir):
    """The CUDA attention path in the engine (decode rows and prefill chunks that continue a sequence
    in one Triton call), run under the interpreter on the CPU, gives the reference's greedy tokens."""
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine, load_tokenizer
    from server.engine.protocol import GenerationRequest, SamplingParams
    from server.model import load_model
    from server.model.generate import greedy_generate

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (21, 40, 33, 26)]
    ref = greedy_generate(model, prompts, 5)
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", kv_cache_memory=8 << 20, max_num_batched_tokens=16,
                       max_num_seqs=3, block_size=16)  # 16-token chunks: most prefill chunks continue a sequence
    engine = LLMEngine(cfg, model=model, tokenizer=load_tokenizer(tiny_model_dir))
    engine.runner.backend = "triton"
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert [[t for e in out[f"r{i}"] for t in e.token_ids] for i in range(len(prompts))] == ref
