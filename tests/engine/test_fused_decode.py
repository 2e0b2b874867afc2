"""The one-call C decode forward (server/model/fused_decode.py, kernels/decode_cpu.cpp) computes what
the Python path computes, and runs only on the steps it serves."""

from __future__ import annotations

import types

import pytest
import torch

from server.engine.kv_cache import KVCache
from server.engine.model_runner import ModelRunner
from server.engine.paged_attention import PagedAttentionStep
from server.model import StepContext, load_model, step_context
from server.model.fused_decode import ENV_SWITCH, f32_linear, load_library
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(load_library() is None, reason="C++ kernels unavailable")

VARIANTS = {
    "gqa-tied": ("llama", {}),
    "qwen2-bias-untied": ("qwen2", {"tie_word_embeddings": False}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "llama-all-bias-d32": ("llama", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True,
                                     "head_dim": 32}),
    "mha-d12": ("llama", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4}),  # scalar attention
    "int4": ("llama", {}, "int4"),  # quantized linears: the formats' own C kernel (kernels/quant_cpu)
    "qwen2-bias-int8": ("qwen2", {}, "int8"),
}


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("fused")
    return {name: load_model(make_tiny_model(root / name, default_model_dir, model_type=v[0], seed=2, **v[1]),
                             quantization=v[2] if len(v) > 2 else "none")
            for name, v in VARIANTS.items()}


def _seqs(lens, bs, num_blocks, gen):
    """Fake sequences (what ``ModelRunner.build_attention`` reads) of ``lens`` tokens in shuffled blocks,
    each with room for 8 more tokens."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs = []
    for n in lens:
        need = -(-(n + 8) // bs)
        table, perm = perm[:need], perm[need:]
        seqs.append(types.SimpleNamespace(num_computed_tokens=0, block_table=table))
    return seqs


def _step(model, runner, seqs, num_tokens, ids, fused: bool, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "1" if fused else "0")
    positions, meta = runner.build_attention(seqs, num_tokens)
    ctx = StepContext(positions=positions, attention=PagedAttentionStep(runner.cache, meta, runner.backend,
                                                                        model.config.sliding_window))
    before = model.fused_decode_steps
    with torch.inference_mode(), step_context(ctx):
        logits = model(torch.tensor(ids))
    return logits, model.fused_decode_steps - before


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_logits_and_cache_equal_python_path(variant_models, name, monkeypatch):
    """Several decode steps of 5 sequences of different lengths (blocks of 4, contexts crossing block
    boundaries): the fused step's logits and the keys/values it writes equal the Python path's."""
    model = variant_models[name]
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(model.config, 40, 4, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, cache, (2,))
    assert runner.backend == "cpu_kernel"
    lens = [1, 3, 4, 9, 14]
    seqs = _seqs(lens, 4, cache.num_blocks, gen)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]
    logits, fused = _step(model, runner, seqs, lens, [t for p in prompts for t in p], True, monkeypatch)
    assert fused == 0  # prefill rows: the Python path
    for s, n in zip(seqs, lens):
        s.num_computed_tokens = n
    ends = torch.tensor(lens).cumsum(0) - 1
    nxt = logits[ends].argmax(-1).tolist()
    for _ in range(5):
        k0, v0 = cache.k.clone(), cache.v.clone()
        ref, fused = _step(model, runner, seqs, [1] * len(seqs), nxt, False, monkeypatch)
        assert fused == 0
        k_ref, v_ref = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        got, fused = _step(model, runner, seqs, [1] * len(seqs), nxt, True, monkeypatch)
        assert fused == 1
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        torch.testing.assert_close(cache.k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v, v_ref, rtol=1e-5, atol=1e-5)
        for s in seqs:
            s.num_computed_tokens += 1
        nxt = ref.argmax(-1).tolist()
        # asking a linear for its C kernel again (a benchmark does) hands out the same weight handle
        for m in model.modules():
            if hasattr(m, "c_linear"):
                assert m.c_linear() == m.c_linear()


def test_not_taken_with_prefill_rows_banks_or_the_torch_backend(variant_models, monkeypatch):
    model = variant_models["gqa-tied"]
    gen = torch.Generator().manual_seed(1)
    cache = KVCache(model.config, 20, 4, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, cache, (2,))
    seqs = _seqs([5, 6], 4, cache.num_blocks, gen)
    ids = torch.randint(3, 100, (11,), generator=gen).tolist()
    _step(model, runner, seqs, [5, 6], ids, True, monkeypatch)
    seqs[0].num_computed_tokens, seqs[1].num_computed_tokens = 5, 3
    _, fused = _step(model, runner, seqs, [1, 3], ids[:4], True, monkeypatch)  # a decode row beside a chunk
    assert fused == 0
    seqs[1].num_computed_tokens = 6

    class NoOpAdapters:  # a bank in the step (adding nothing): the hook points must run
        calls = 0

        def linear(self, layer, targets, x, out):
            NoOpAdapters.calls += 1

        def mlp(self, layer, x, mlp):
            return None

    monkeypatch.setenv(ENV_SWITCH, "1")
    positions, meta = runner.build_attention(seqs, [1, 1])
    ctx = StepContext(positions=positions, attention=PagedAttentionStep(cache, meta, runner.backend, None),
                      adapters=NoOpAdapters())
    before = model.fused_decode_steps
    with torch.inference_mode(), step_context(ctx):
        model(torch.tensor(ids[:2]))
    assert model.fused_decode_steps == before and NoOpAdapters.calls == 4 * model.config.num_hidden_layers
    runner.backend = "torch"
    _, fused = _step(model, runner, seqs, [1, 1], ids[:2], True, monkeypatch)
    assert fused == 0
    runner.backend = "cpu_kernel"
    _, fused = _step(model, runner, seqs, [1, 1], ids[:2], True, monkeypatch)
    assert fused == 1
    decoder = model.fused_decoder()
    assert decoder.max_rows == 16  # fp32 linears: larger steps are faster on the per-layer path
    monkeypatch.setattr(decoder, "max_rows", 1)
    _, fused = _step(model, runner, seqs, [1, 1], ids[:2], True, monkeypatch)
    assert fused == 0


def test_engine_greedy_tokens_equal_with_the_switch_on_and_off(make_engine, tiny_model, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    vocab = tiny_model.config.vocab_size
    from server.engine.protocol import GenerationRequest, SamplingParams

    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (2, 5, 11, 19, 30)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        engine = make_engine(block_size=4, max_num_seqs=8)
        before = tiny_model.fused_decode_steps
        out = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
        outs[switch] = [[t for e in out[f"r{i}"] for t in e.token_ids] for i in range(len(prompts))]
        steps = tiny_model.fused_decode_steps - before
        assert (steps > 0) == (switch == "1"), steps
    assert outs["0"] == outs["1"]


def test_bank_requests_take_the_fused_path_unless_an_ffn_is_replaced(tiny_model_dir, tmp_path, monkeypatch):
    """In the engine: decode steps of DynMoLE (FFN) and PEFT LoRA (attention) rows, alone and mixed with
    base rows, take the fused path with the same greedy tokens as the per-layer path; a MixLoRA bank
    (routed FFN) and a factor bank (FactorLLM FFN) never do; a LoRA bank on only some of q/k/v (its
    linear on the general path) does not either."""
    from adapters.runtime import BankRegistry
    from tests.runtime.helpers import greedy_request, make_engine, tokens_of
    from tests.runtime.test_factor_serving import factor_bank

    engine = make_engine(tiny_model_dir, None)
    model = engine.model
    registry = BankRegistry(engine.model_config, allowed_roots=[tmp_path])
    banks = {"dyn": _bank("dynmole", model, 0, "dyn", FFN), "lora": _bank("lora", model, 1, "lora", ATTN),
             "mix": _bank("mixlora", model, 2, "mix", None), "qv": _bank("lora", model, 3, "qv", None),
             "fac": factor_bank(tiny_model_dir, engine.model_config, 4, 2, seed=1, scale=1.5)}
    for name, bank in banks.items():
        bank.save(tmp_path / name)
        registry.load_sync(name, tmp_path / name)
    engine.set_adapter_provider(registry)
    prompts = [list(range(10 + i, 17 + 2 * i)) for i in range(3)]

    def run(rows: list[str | None], switch: str) -> tuple[list[list[int]], int]:
        monkeypatch.setenv(ENV_SWITCH, switch)
        before = model.fused_decode_steps
        out = engine.generate([greedy_request(f"{switch}{i}", prompts[i % 3], b, 6) for i, b in enumerate(rows)])
        return [tokens_of(out[f"{switch}{i}"]) for i in range(len(rows))], model.fused_decode_steps - before

    base, _ = run([None], "1")
    for rows, taken in ((["dyn"], True), (["lora"], True), (["dyn", None, "lora", "dyn"], True), (["mix"], False),
                        (["fac"], False), (["qv"], False), (["dyn", "mix"], False)):
        on, steps = run(rows, "1")
        assert (steps > 0) == taken, (rows, steps)
        off, steps = run(rows, "0")
        assert steps == 0 and on == off, rows
        assert not taken or on[0] != base[0], rows  # the fused step really ran the bank


def test_f32_linear_matches_torch():
    lib = load_library()
    gen = torch.Generator().manual_seed(4)
    for n, k in ((7, 5), (33, 64), (130, 97)):  # short tiles, K tails
        w = torch.randn(n, k, generator=gen)
        fn, handle = f32_linear(w)
        import ctypes

        for m in (1, 2, 3, 4, 5, 9):
            x = torch.randn(m, k, generator=gen)
            y = torch.full((m, n), 7.0)
            lib.ms_f32linear(ctypes.addressof(handle), x.data_ptr(), m, y.data_ptr(), 2)
            torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_weight_in_new_storage_gets_a_new_handle(variant_models):
    linear = variant_models["mha-d12"].layers[0].self_attn.o_proj
    fn, first = linear.c_linear()
    linear.weight.data = linear.weight.data.clone()  # what ``.to()`` does to a parameter
    assert linear.c_linear() == (fn, linear.c_linear()[1]) and linear.c_linear()[1] != first


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "auto"])
def test_default_model_greedy_tokens_equal_with_the_switch_on_and_off(default_model_dir, monkeypatch, quantization):
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.protocol import GenerationRequest, SamplingParams

    engine = LLMEngine(EngineConfig(model=default_model_dir, device="cpu", quantization=quantization,
                                    kv_cache_memory=64 << 20, max_num_seqs=4))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [list(range(1000, 1064)), list(range(2000, 2007)), list(range(300, 333))]
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        before = engine.model.fused_decode_steps
        out = engine.generate([GenerationRequest(f"{switch}-{i}", p, params) for i, p in enumerate(prompts)])
        outs[switch] = [[t for e in out[f"{switch}-{i}"] for t in e.token_ids] for i in range(len(prompts))]
        assert (engine.model.fused_decode_steps > before) == (switch == "1")
    assert outs["0"] == outs["1"]


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def _bank(kind, model, seed, name, targets, **routing):
    import dataclasses

    from adapters import BaseFingerprint
    from tests.adapters.bank_builders import random_bank

    bank = random_bank(kind, BaseFingerprint.from_hf_config(model.config.raw), r=4, seed=seed, name=name,
                       targets=targets)
    for layer in bank.layers:  # moderate deltas: routing and tokens away from ties
        for ex in layer.linears.values():
            ex.lora_b.mul_(0.05)
    if routing:
        bank.routing = dataclasses.replace(bank.routing, **routing)
    return bank


def _stats_equal(a, b):
    assert a.banks.keys() == b.banks.keys()
    for name, s in a.banks.items():
        o = b.banks[name]
        assert (s.tokens, s.decisions, s.broadcast) == (o.tokens, o.decisions, o.broadcast), name
        assert s.entropy_sum == pytest.approx(o.entropy_sum, rel=1e-5, abs=1e-6)
        assert torch.equal(torch.as_tensor(s.experts_per_decision), torch.as_tensor(o.experts_per_decision))
        assert torch.equal(torch.as_tensor(s.entropy_counts), torch.as_tensor(o.entropy_counts))
        assert dict(s.selections).keys() == dict(o.selections).keys()
        for k, v in dict(s.selections).items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(dict(o.selections)[k])), (name, k)


@pytest.mark.parametrize("name,pool_dtype", [("gqa-tied", torch.float32), ("int4", torch.float32),
                                             ("int4", torch.int8)])
def test_bank_rows_in_the_fused_step_equal_the_python_path(variant_models, name, pool_dtype, monkeypatch):
    """Decode steps mixing base rows, rows of 3 DynMoLE banks (FFN, per-bank routing parameters) and
    rows of a PEFT LoRA bank (attention): fused (banks' route_lora calls inside the one C forward)
    and per-layer logits, cache writes, routing statistics and route_lora records are the same
    (an int8 pool too: its row scales reach the fused step's route_lora calls)."""
    from adapters.runtime import BankRegistry

    model = variant_models[name]
    registry = BankRegistry(model.config, dtype=pool_dtype)
    registry.add(_bank("dynmole", model, 0, "dyn0", FFN))
    registry.add(_bank("dynmole", model, 1, "dyn1", FFN, top_p=0.8, entropy_threshold=0.7))
    registry.add(_bank("dynmole", model, 2, "dyn2", FFN, keep_top_k=2))
    registry.add(_bank("lora", model, 3, "lora", ATTN))
    names = [None, "dyn0", "lora", "dyn1", "dyn2", None, "dyn0", "lora"]
    handles = {n: registry.acquire(n) for n in set(names) if n}
    row_handles = [handles.get(n) for n in names]
    gen = torch.Generator().manual_seed(5)
    cache = KVCache(model.config, 60, 4, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, cache, (2,))
    lens = [2, 3, 5, 4, 9, 1, 7, 6]
    seqs = _seqs(lens, 4, cache.num_blocks, gen)
    vocab = model.config.vocab_size
    ids = [t for n in lens for t in torch.randint(3, vocab, (n,), generator=gen).tolist()]

    def step(num_tokens, ids, fused):
        monkeypatch.setenv(ENV_SWITCH, "1" if fused else "0")
        positions, meta = runner.build_attention(seqs, num_tokens)
        adapters = registry.build_step(row_handles, num_tokens)
        ctx = StepContext(positions=positions, attention=PagedAttentionStep(cache, meta, runner.backend, None),
                          adapters=adapters)
        before = model.fused_decode_steps
        with torch.inference_mode(), step_context(ctx):
            logits = model(torch.tensor(ids))
        return logits, model.fused_decode_steps - before, adapters

    logits, fused, _ = step(lens, ids, True)
    assert fused == 0  # prefill rows: the Python path
    for s, n in zip(seqs, lens):
        s.num_computed_tokens = n
    nxt = logits[torch.tensor(lens).cumsum(0) - 1].argmax(-1).tolist()
    for _ in range(4):
        k0, v0 = cache.k.clone(), cache.v.clone()
        ref, fused, ref_step = step([1] * len(seqs), nxt, False)
        assert fused == 0
        k_ref, v_ref = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        got, fused, got_step = step([1] * len(seqs), nxt, True)
        assert fused == 1
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        torch.testing.assert_close(cache.k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v, v_ref, rtol=1e-5, atol=1e-5)
        # every adapted linear ran its route_lora call, in the same order, with the same statistics
        assert list(got_step._fast.used) == list(ref_step._fast.used) and len(got_step._fast.used) == 4 * 2
        assert not got_step._records and not ref_step._records
        stats = got_step.routing_stats()
        _stats_equal(stats, ref_step.routing_stats())
        # every DynMoLE row routed once per site: gate, up, down of 2 layers
        dyn = ("dyn0", "dyn1", "dyn2")
        assert [stats.banks[n].decisions for n in dyn] == [6 * names.count(n) for n in dyn]
        for s in seqs:
            s.num_computed_tokens += 1
        nxt = ref.argmax(-1).tolist()
