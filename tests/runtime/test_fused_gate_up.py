"""The fused gate/up path (one router GEMM and one routing call for both targets, C++ plans)
equals separate per-target calls and the torch plan path, routing statistics included."""

import dataclasses
import math

import pytest
import torch

from adapters import BaseFingerprint, ExpertBank, LayerAdapters, LinearExperts, RoutingConfig
from adapters.runtime import BankRegistry
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of

TARGETS = ("gate_proj", "up_proj", "down_proj")


def fingerprint_of_cfg(cfg):
    return BaseFingerprint.from_hf_config(cfg.raw)


def _bank(fp, name, seed, experts, routing, kind="dynmole"):
    gen = torch.Generator().manual_seed(seed)
    layers = [LayerAdapters() for _ in range(fp.num_hidden_layers)]
    for layer in layers:
        for t in TARGETS:
            i, o = fp.linear_shape(t)
            layer.linears[t] = LinearExperts(
                lora_a=torch.randn(experts, 4, i, generator=gen) / math.sqrt(i),
                lora_b=torch.randn(experts, o, 4, generator=gen) * 0.1, scaling=2.0,
                router=(torch.randn(experts, i, generator=gen) * 2 / math.sqrt(i)) if kind != "lora" else None)
    return ExpertBank(name=name, version="1", kind=kind, base=fp, rank=4, alpha=8.0, use_rslora=False,
                      routing=routing, targets=TARGETS, layers=layers)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    cfg = ModelConfig.from_folder(tiny_model_dir)
    fp = fingerprint_of(tiny_model_dir)
    banks = [
        _bank(fp, "a", 0, 6, RoutingConfig("dynmole")),
        _bank(fp, "b", 1, 6, RoutingConfig("dynmole", top_p=0.5, keep_top_k=1, entropy_threshold=0.6)),
        _bank(fp, "c", 2, 6, RoutingConfig("dynmole", entropy_type="shannon", entropy_threshold=0.8)),
        _bank(fp, "d", 3, 4, RoutingConfig("dynmole", entropy_index=1.5)),
        _bank(fp, "lora", 4, 1, RoutingConfig("none"), kind="lora"),
    ]
    return cfg, banks


def _steps(cfg, banks, names, backends=("auto", "torch"), dtype=torch.float32):
    out = []
    for backend in backends:
        reg = BankRegistry(cfg, backend=backend, dtype=dtype)
        for b in banks:
            reg.add(b)
        handles = {n: reg.acquire(n) for n in set(names) if n}
        out.append(reg.build_step([handles.get(n) for n in names], [1] * len(names)))
    return out


@pytest.mark.parametrize("names", [
    ["a", "b", "a", "b", "a", "a", "b", "b"],  # one group, per-token parameters
    ["a", "c", None, "d", "lora", "b", "a", None, "d", "c", "lora", "a"],  # groups, base and plain tokens
    ["c", "c", "c"],  # another entropy type alone
    ["a", None, "b", "a", None, "b", "a"],  # one DynMoLE group on some rows (the fused C++ route + plan)
])
@pytest.mark.parametrize("whole", [True, False])  # False: routing + plans in one C++ call, kernels apart
def test_fused_gate_up_equals_separate_calls(setup, names, whole, monkeypatch):
    cfg, banks = setup
    if not whole:
        monkeypatch.setattr("adapters.runtime.step.FAST_PATH", False)
    fused, torch_path = _steps(cfg, banks, names)
    separate, = _steps(cfg, banks, names, backends=("auto",))
    t, inter = len(names), cfg.intermediate_size
    gen = torch.Generator().manual_seed(7)
    results = []
    for layer in range(cfg.num_hidden_layers):
        x = torch.randn(t, cfg.hidden_size, generator=gen)
        x[0] = 0.0  # uniform routing: ties and broadcast
        base = torch.randn(t, 2 * inter, generator=gen)
        a, b, c = base.clone(), base.clone(), base.clone()
        fused.linear(layer, ("gate_proj", "up_proj"), x, a)
        torch_path.linear(layer, ("gate_proj", "up_proj"), x, b)
        separate.linear(layer, ("gate_proj",), x, c[:, :inter])
        separate.linear(layer, ("up_proj",), x, c[:, inter:])
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        results.append(a)
        xd = torch.randn(t, inter, generator=gen)  # a single site (down): the same paths, M = 1
        base = torch.randn(t, cfg.hidden_size, generator=gen)
        d1, d2, d3 = base.clone(), base.clone(), base.clone()
        fused.linear(layer, ("down_proj",), xd, d1)
        torch_path.linear(layer, ("down_proj",), xd, d2)
        separate.linear(layer, ("down_proj",), xd, d3)
        torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d1, d3, rtol=0, atol=1e-6)
    # the one-call C++ path ran exactly where its conditions hold (one DynMoLE Tsallis group, nothing plain)
    assert bool(fused._fast.used) == (whole and all(n in ("a", "b", None) for n in names))
    s_fused, s_sep, s_torch = (s.routing_stats() for s in (fused, separate, torch_path))
    for other in (s_sep, s_torch):
        assert s_fused.banks.keys() == other.banks.keys()
        for name, bs in s_fused.banks.items():
            ob = other.banks[name]
            assert (bs.tokens, bs.decisions, bs.broadcast) == (ob.tokens, ob.decisions, ob.broadcast)
            assert bs.entropy_sum == pytest.approx(ob.entropy_sum, rel=1e-6)
            assert torch.equal(torch.as_tensor(bs.experts_per_decision), torch.as_tensor(ob.experts_per_decision))
            assert torch.equal(torch.as_tensor(bs.entropy_counts), torch.as_tensor(ob.entropy_counts))
            assert bs.selections.keys() == ob.selections.keys()
            for k, v in bs.selections.items():
                assert torch.equal(v, ob.selections[k]), (name, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_whole_linear_on_half_pools_equals_the_torch_path(setup, dtype):
    """The one-call C++ path reads fp16 / bf16 / int8 (+ row scales) pooled weights as the torch path
    does (same rounded weights; int8: the general path dequantizes the slots it uses; a packed int8 B
    (VNNI builds) is within 1% rms of it, h being rounded to int8 per pair)."""
    cfg, banks = setup
    names = ["a", "b", None, "a", "b", "b"]
    fast, torch_path = _steps(cfg, banks, names, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    for layer in range(cfg.num_hidden_layers):
        x = torch.randn(len(names), cfg.hidden_size, generator=gen)
        base = torch.randn(len(names), 2 * cfg.intermediate_size, generator=gen)
        a, b = base.clone(), base.clone()
        fast.linear(layer, ("gate_proj", "up_proj"), x, a)
        torch_path.linear(layer, ("gate_proj", "up_proj"), x, b)
        assert (a - base).abs().max() > 1e-2  # the banks did something
        if dtype == torch.int8 and fast.state.packed:  # the VNNI expand rounds h to int8 per pair (~0.3% rms)
            da, db = a - base, b - base
            assert (da - db).norm() <= 0.01 * db.norm() and (da - db).abs().max() <= 0.02 * db.abs().max()
            assert (da - db).abs().max() > 0  # the packed path ran (the general path's is exact)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fast._fast.used


def test_fast_path_decisions_follow_bank_replacement(setup):
    """The (layer, targets) -> path table is shared by steps with the same bank layouts, and a replaced
    bank (another layout at the same name) gets a fresh one: no stale fast path."""
    cfg, banks = setup
    reg = BankRegistry(cfg)
    reg.add(banks[0])
    h = reg.acquire("a")
    s1, s2 = reg.build_step([h, None], [1, 1]), reg.build_step([h], [3])
    x = torch.randn(1, cfg.hidden_size)
    s1.linear(0, ("gate_proj", "up_proj"), torch.cat([x, x]), torch.zeros(2, 2 * cfg.intermediate_size))
    assert s2._decide is s1._decide and s1._fast.used
    reg.release(h)
    only_down = _bank(fingerprint_of_cfg(cfg), "a", 9, 6, RoutingConfig("dynmole"))
    for layer in only_down.layers:
        del layer.linears["gate_proj"], layer.linears["up_proj"]
    only_down = dataclasses.replace(only_down, version="2", targets=("down_proj",))
    reg.add(only_down)
    h = reg.acquire("a")
    s3 = reg.build_step([h], [1])
    assert s3._decide is not s1._decide
    out = torch.zeros(1, 2 * cfg.intermediate_size)
    s3.linear(0, ("gate_proj", "up_proj"), x, out)
    assert not out.any() and not s3._fast.used  # version 2 adapts no gate / up
    out = torch.zeros(1, cfg.hidden_size)
    s3.linear(0, ("down_proj",), torch.randn(1, cfg.intermediate_size), out)
    assert out.abs().max() > 0 and s3._fast.used
    reg.release(h)


def test_fast_path_without_statistics(setup):
    cfg, banks = setup
    reg = BankRegistry(cfg, collect_stats=False)
    reg.add(banks[0])
    h = reg.acquire("a")
    step = reg.build_step([h, h], [2, 1])
    out = torch.zeros(3, cfg.hidden_size)
    step.linear(1, ("down_proj",), torch.randn(3, cfg.intermediate_size), out)
    assert step._fast.used and step._fast.stats is None and out.abs().max() > 0
    stats = step.routing_stats().banks["a"]
    assert stats.tokens == 3 and stats.decisions == 0 and not stats.selections
    reg.release(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_lora_sites_in_one_call_equal_the_general_path(setup, dtype, monkeypatch):
    """Sites where every bank of the step is a plain LoRA (PEFT LoRA, MixLoRA's attention) also run as one
    C++ call: each token's one slot, weight 1; base tokens untouched; no routing statistics."""
    cfg, banks = setup
    lora2 = _bank(fingerprint_of_cfg(cfg), "lora2", 5, 1, RoutingConfig("none"), kind="lora")
    names = ["lora", None, "lora2", "lora", "lora2", None]

    def steps():
        reg = BankRegistry(cfg, dtype=dtype)
        for b in (banks[4], lora2):
            reg.add(b)
        return reg.build_step([n and reg.acquire(n) for n in names], [1] * len(names))

    gen = torch.Generator().manual_seed(5)
    cases = [(layer, targets, torch.randn(len(names), d_in, generator=gen), torch.randn(len(names), d_out, generator=gen))
             for layer in range(cfg.num_hidden_layers)
             for targets, d_in, d_out in ((("gate_proj", "up_proj"), cfg.hidden_size, 2 * cfg.intermediate_size),
                                          (("down_proj",), cfg.intermediate_size, cfg.hidden_size))]

    def outputs(step):
        outs = []
        for layer, targets, x, base in cases:
            out = base.clone()
            step.linear(layer, targets, x, out)
            outs.append(out)
        return outs

    fast = steps()
    got = outputs(fast)
    monkeypatch.setattr("adapters.runtime.step.FAST_PATH", False)
    general = steps()
    for a, b, (_, _, _, base) in zip(got, outputs(general), cases):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a[[1, 5]], base[[1, 5]]) and (a - base).abs().max() > 1e-3
    assert fast._fast.used and all(d.plain for d in fast._fast.used) and not general._fast.used
    stats = fast.routing_stats().banks
    assert stats["lora"].tokens == 2 and stats["lora"].decisions == 0 and not stats["lora"].selections


@pytest.mark.parametrize("names", [
    ["a", "c", None, "d", "lora", "b", "a", None, "d", "c", "lora", "a"],
    ["a", "b", "a", "b", "a", "a", "b", "b"],
])
def test_static_plans_equal_dynamic_plans(setup, names, monkeypatch):
    """The GPU path's plans (static sizes, no host sync; forced here on the CPU) give the same deltas
    as the dynamic plans, computed from the plans' pairs (what the segmented GPU kernels read)."""
    cfg, banks = setup

    def from_pairs(x, a, b, slots, weights, scaling, *, backend, plan):
        seg = torch.repeat_interleave(torch.arange(plan.num_segments), plan.seg_len)  # pairs the segments cover
        covered = torch.cat([torch.arange(s, s + n) for s, n in zip(plan.seg_start.tolist(), plan.seg_len.tolist())]
                            + [torch.zeros(0, dtype=torch.long)])
        slot = plan.seg_slot[seg]
        assert torch.equal(slot, plan.pair_slot[covered])
        tok = plan.pair_token[covered]
        sc = scaling[slot] if isinstance(scaling, torch.Tensor) else scaling
        h = torch.einsum("prd,pd->pr", a[slot].float(), x[tok].float())
        y = torch.einsum("por,pr->po", b[slot].float(), h) * (plan.pair_weight[covered] * sc)[:, None]
        return torch.zeros(x.shape[0], b.shape[1]).index_add_(0, tok, y)

    monkeypatch.setattr("adapters.runtime.step.routed_lora", from_pairs)
    dynamic, static = _steps(cfg, banks, names, backends=("torch", "torch"))
    static.static_plans = True
    gen = torch.Generator().manual_seed(11)
    t, inter = len(names), cfg.intermediate_size
    for layer in range(cfg.num_hidden_layers):
        x = torch.randn(t, cfg.hidden_size, generator=gen)
        base = torch.randn(t, 2 * inter, generator=gen)
        a, b = base.clone(), base.clone()
        dynamic.linear(layer, ("gate_proj", "up_proj"), x, a)
        static.linear(layer, ("gate_proj", "up_proj"), x, b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, base)
