"""The decode graph runner (``server.engine.cuda_graphs``) in its eager mode on the CPU: the same
static buffers, padding, copy-in and slice-out a captured graph replays, checked against the plain
path; and the captured region is free of host syncs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine.cuda_graphs import DecodeGraphRunner, HostSyncError, capture_sizes, forbid_host_syncs
from server.engine.protocol import GenerationRequest, SamplingParams


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


def _requests(vocab, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [GenerationRequest(f"r{i}", torch.randint(3, vocab, (2 + 3 * i % 11,), generator=g).tolist(),
                              SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True))
            for i in range(n)]


def _tokens(out):
    return {rid: [t for e in evs for t in e.token_ids] for rid, evs in out.items()}


def _counting(engine):
    """Count the decode steps that went through the graph runner, and the rows it padded to."""
    graphs = engine.runner.graphs
    seen = []
    real = graphs.copy_in

    def copy_in(ids, positions, tables):
        size = real(ids, positions, tables)
        seen.append((len(ids), size))
        return size

    graphs.copy_in = copy_in
    return seen


@pytest.mark.parametrize("backend", ["cpu_kernel", "torch"])
@pytest.mark.parametrize("n", [3, 7])  # 3: padded up to 4; 7: past the largest size (4) at first, eager
def test_graph_runner_decode_equals_plain_path(make_engine, tiny_model, backend, n):
    vocab = tiny_model.config.vocab_size
    plain = make_engine(max_num_seqs=8)
    plain.runner.backend = backend
    expected = _tokens(plain.generate(_requests(vocab, n)))

    engine = make_engine(max_num_seqs=8)
    engine.runner.backend = backend
    graphs = engine.runner.enable_graphs(4, engine.max_model_len, capture=True)  # capture: a no-op off CUDA
    assert graphs.batch_sizes == [1, 2, 4] and not graphs.graphs
    seen = _counting(engine)
    assert _tokens(engine.generate(_requests(vocab, n))) == expected
    assert seen, "no decode step went through the graph runner"
    assert all(size == graphs.size_for(rows) and size >= rows for rows, size in seen)
    if n == 3:
        assert any(rows < size for rows, size in seen)  # padding rows were exercised
    else:  # 7 sequences decode eagerly (past the largest size); the graph path only once some finished
        assert all(rows <= 4 for rows, _ in seen)


def test_padding_rows_write_only_the_scratch_block(make_engine, tiny_model):
    engine = make_engine(max_num_seqs=8)
    graphs = engine.runner.enable_graphs(4, engine.max_model_len, capture=False)
    cache = engine.cache
    bs = cache.block_size
    tables = [[5, 2], [7]]
    positions = [bs + 3, 4]
    before_k, before_v = cache.k.clone(), cache.v.clone()
    logits = graphs.run([11, 12], positions, tables)  # 2 rows: size 2, no padding; then 3 rows: size 4
    assert logits.shape == (2, tiny_model.config.vocab_size)
    logits = graphs.run([11, 12, 13], positions + [0], tables + [[9]])
    assert logits.shape[0] == 3
    written = {2 * bs + 3, 7 * bs + 4, 9 * bs}
    changed = (cache.k != before_k).flatten(3).any(-1).any(0).flatten().nonzero().flatten().tolist()
    changed_v = (cache.v != before_v).flatten(3).any(-1).any(0).flatten().nonzero().flatten().tolist()
    scratch = set(range(cache.scratch_block * bs, (cache.scratch_block + 1) * bs))
    assert set(changed) - scratch == written and set(changed_v) - scratch == written
    assert set(changed) & scratch, "the padding row did not write the scratch block"
    assert cache.scratch_block == engine.block_manager.num_blocks  # never handed out


@pytest.mark.parametrize("backend", ["cpu_kernel", "torch"])
def test_captured_region_has_no_host_sync(make_engine, backend):
    engine = make_engine(max_num_seqs=8)
    engine.runner.backend = backend
    graphs = DecodeGraphRunner(engine.model, engine.cache, backend, batch_sizes=[1, 2, 4],
                               max_blocks=-(-engine.max_model_len // engine.cache.block_size))
    graphs.copy_in([5, 6, 7], [3, 0, 17], [[1], [2], [3, 4]])
    with torch.inference_mode(), forbid_host_syncs():
        out = graphs._forward(4)  # what capture records
    assert out.shape[0] == 4


def test_host_sync_guard_catches_syncs(make_engine, monkeypatch):
    t = torch.arange(4)
    for sync in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[1]),
                 lambda: t.nonzero(), lambda: torch.unique(t), lambda: t[t > 1], lambda: t.cpu()):
        with forbid_host_syncs(), pytest.raises(HostSyncError):
            sync()
    assert t.sum().item() == 6  # restored
    # a sync slipped into a layer is caught in the region
    engine = make_engine(max_num_seqs=8)
    graphs = DecodeGraphRunner(engine.model, engine.cache, engine.runner.backend, batch_sizes=[2], max_blocks=4)
    from server.model import layers

    real = layers.RMSNorm.forward
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x: real(self, x) * (1.0 if x.abs().max() > 0 else 0.0))
    with torch.inference_mode(), forbid_host_syncs(), pytest.raises(HostSyncError):
        graphs._forward(2)


def test_banks_prefill_and_prompt_logprobs_run_eagerly(make_engine, tiny_model):
    engine = make_engine(max_num_seqs=8)
    graphs = engine.runner.enable_graphs(4, engine.max_model_len, capture=False)
    seen = _counting(engine)
    req = GenerationRequest("p", [5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                              prompt_logprobs=1))
    out = engine.generate([req])
    assert len(_tokens(out)["p"]) == 3
    assert len(seen) == 2  # the two decode steps after the prompt; the prefill ran eagerly
    assert graphs.size_for(5) is None
    runner = engine.runner
    seq = SimpleNamespace(params=SamplingParams(), mm_spans=(), num_computed_tokens=9, num_prompt_tokens=4,
                          block_table=[1])
    assert runner._graph_covers([seq], [1], adapters=None)
    assert not runner._graph_covers([seq], [1], adapters=object())  # a step with banks: eager
    assert not runner._graph_covers([seq], [2], adapters=None)  # a prefill chunk: eager
    assert not runner._graph_covers([seq] * 5, [1] * 5, adapters=None)  # past the largest size: eager
    image = SimpleNamespace(params=SamplingParams(), mm_spans=((0, 2),), num_computed_tokens=3, num_prompt_tokens=4,
                            block_table=[1])
    assert not runner._graph_covers([image], [1], adapters=None)  # an image's prompt row: eager
