"""The decode graph runner (``server.engine.cuda_graphs``) in its eager mode on the CPU: the same
static buffers, padding, copy-in and slice-out a captured graph replays, checked against the plain
path; and the captured region is free of host syncs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine.cuda_graphs import (
    DecodeGraphRunner,
    HostSyncError,
    capture_sizes,
    forbid_host_syncs,
)
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
                 lambda: t.nonzero(), lambda: torch.unique(t), lambda: t[t > 1], lambda: t.cpu(), lambda: torch.tensor([1, 2], device=t.device)):
        with forbid_host_syncs(), pytest.raises(HostSyncError):
            sync()
    assert t.sum().item() == 6  # restored
    # a sync slipped into a layer is caught in the region (the layers' Python path, as on CUDA: not the
    # CPU's one-call decode forward)
    monkeypatch.setenv("MOLESERVE_FUSED_DECODE", "0")
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


KINDS = ("lora", "mixlora", "dynmole", "mola")


def _bank_engine(tiny_model_dir, graphs: bool):
    from adapters.runtime import BankRegistry
    from tests.adapters.bank_builders import fingerprint_of, random_bank
    from tests.runtime.helpers import make_engine as make_bank_engine

    engine = make_bank_engine(tiny_model_dir, None, max_num_seqs=8)
    registry = BankRegistry(engine.model_config)
    fp = fingerprint_of(tiny_model_dir)
    for i, kind in enumerate(KINDS):
        bank = random_bank(kind, fp, r=4, experts_per_layer=(3 + i % 2, 2), seed=i, name=kind)
        for layer in bank.layers:  # moderate deltas: greedy tokens not near ties
            for ex in layer.linears.values():
                ex.lora_b.mul_(0.05)
        registry.add(bank)
    engine.set_adapter_provider(registry)
    if graphs:
        engine.runner.enable_graphs(8, engine.max_model_len, capture=False)
    return engine


def _bank_requests(vocab, banks):
    g = torch.Generator().manual_seed(5)
    return [GenerationRequest(f"b{i}", torch.randint(3, vocab, (3 + 2 * i,), generator=g).tolist(),
                              SamplingParams(max_tokens=4 + i % 3, temperature=0.0, ignore_eos=True), bank=bank)
            for i, bank in enumerate(banks)]


def test_banks_through_the_graph_runner_equal_plain_path(tiny_model_dir, monkeypatch):
    """Steps with banks go through the padded, cached ``BankStep`` of their signature (what a capture
    records and a replay reruns): same tokens as the plain path, every kind of bank, padding rows."""
    banks = [*KINDS, None, "dynmole", "mixlora"]  # 7 sequences: padded to 8
    vocab = _bank_engine(tiny_model_dir, False).model_config.vocab_size
    expected = _tokens(_bank_engine(tiny_model_dir, False).generate(_bank_requests(vocab, banks)))
    engine = _bank_engine(tiny_model_dir, True)
    graphs = engine.runner.graphs
    reused = []
    real = graphs._run_banks

    def run_banks(size, adapters):
        from server.engine.cuda_graphs import bank_signature

        reused.append(bank_signature(adapters, size) in graphs.bank_graphs)
        return real(size, adapters)

    graphs._run_banks = run_banks
    assert _tokens(engine.generate(_bank_requests(vocab, banks))) == expected
    assert any(reused), "no step with banks reused its signature's step"
    # the cached padded steps now hold their metadata: a forward through each has no host sync
    # (DynMoLE routing as on CUDA: the torch version, not the CPU's C++ call)
    from kernels.routed_lora import cpu_ops

    monkeypatch.setattr(cpu_ops, "dynamic_route_cpu", lambda *a, **k: None)
    assert len(graphs.bank_graphs) >= 2
    for key, entry in graphs.bank_graphs.items():
        size = key[0]
        with torch.inference_mode(), forbid_host_syncs():
            graphs._forward(size, entry.step)


def test_bank_graph_routing_stats_reach_the_engine(tiny_model_dir):
    vocab = _bank_engine(tiny_model_dir, False).model_config.vocab_size
    stats = {}
    for use in (False, True):
        engine = _bank_engine(tiny_model_dir, use)
        seen = []
        engine.set_stats_sink(SimpleNamespace(on_step=lambda s, seen=seen: seen.append(s), on_request_finished=lambda s: None))
        engine.generate(_bank_requests(vocab, ["dynmole", "dynmole", None]))
        stats[use] = [sorted((name, b.tokens, b.decisions, b.broadcast) for name, b in s.routing.banks.items())
                      for s in seen if s.routing is not None]
    assert stats[True] == stats[False] and any(stats[True])
