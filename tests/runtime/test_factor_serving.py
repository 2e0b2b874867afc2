"""Factor banks (FactorLLM) served through the bank registry and the engine, alone, in mixed
batches, and with a LoRA-expert bank on top (``factor+bank``)."""

from __future__ import annotations

import pytest
import torch

from adapters.factor import FactorStep, build_factor_bank, load_factor_weights
from adapters.factor.decode import greedy_decode
from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankCombinationRefused
from server.engine.protocol import UnknownBank
from tests.adapters.bank_builders import fingerprint_of, random_bank
from server.model import SequenceKVCache, StepContext, step_context
from tests.runtime.helpers import flat_logits, greedy_request, make_engine, tokens_of

MAX = 6


def factor_bank(model_dir, cfg, experts: int, top_k: int, *, seed: int = 0, scale: float = 1.0, layers=None,
                name: str = "fac"):
    """A factor bank with random routers and neuron permutations (as tests/factor builds them)."""
    gen = torch.Generator().manual_seed(seed)
    n, inter, hidden = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    chosen = range(n) if layers is None else layers
    routers = [torch.randn(experts, hidden, generator=gen) if i in chosen else None for i in range(n)]
    perms = [torch.randperm(inter, generator=gen) if i in chosen else None for i in range(n)]
    return build_factor_bank(name, fingerprint_of(model_dir), top_k=top_k, routers=routers, permutations=perms,
                             scales=[scale] * n)


def lora_bank(model_dir, kind: str, seed: int, name: str):
    bank = random_bank(kind, fingerprint_of(model_dir), r=4, experts_per_layer=(3, 2), seed=seed, name=name)
    for layer in bank.layers:  # moderate deltas: greedy tokens away from ties
        for ex in layer.linears.values():
            ex.lora_b.mul_(0.05)
    return bank


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """One engine with a registry holding: fac (E=4, K=2), full (E=K=4), fac1 (E=4, K=1, layer 1
    only), dyn (dynmole), mix (mixlora). The banks load from files *before* the engine attaches
    its model (as ``moleserve serve --banks`` does)."""
    root = tmp_path_factory.mktemp("banks")
    engine = make_engine(tiny_model_dir, None)
    cfg = engine.model_config
    registry = BankRegistry(cfg, allowed_roots=[root])
    banks = {
        "fac": factor_bank(tiny_model_dir, cfg, 4, 2, seed=1, scale=1.5),
        "full": factor_bank(tiny_model_dir, cfg, 4, 4, seed=2),
        "fac1": factor_bank(tiny_model_dir, cfg, 4, 1, seed=3, scale=2.0, layers=[1]),
        "dyn": lora_bank(tiny_model_dir, "dynmole", 4, "dyn"),
        "mix": lora_bank(tiny_model_dir, "mixlora", 5, "mix"),
    }
    for name, bank in banks.items():
        bank.save(root / name)
        registry.load_sync(name, root / name)
    engine.set_adapter_provider(registry)  # attaches the model: the factor banks are packed now
    return engine, registry, banks


def _prompts(engine, n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    return [torch.randint(0, vocab, (3 + 2 * i,), generator=gen).tolist() for i in range(n)]


@torch.no_grad()
def _logits(model, prompts, adapters=None):
    cache = SequenceKVCache(model.config)
    lens = [len(p) for p in prompts]
    step = cache.step(list(range(len(prompts))), lens)
    with step_context(StepContext(positions=step.positions(), attention=step, adapters=adapters)):
        return list(model(torch.tensor([t for p in prompts for t in p])).split(lens))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _run(engine, bank, prompt, rid="x"):
    return tokens_of(engine.generate([greedy_request(rid, prompt, bank, MAX)])[rid])


def test_listed_like_any_bank_and_outside_the_pool(served):
    engine, registry, banks = served
    info = {b["name"]: b for b in registry.list()}
    assert info["fac"]["kind"] == "factor" and info["fac"]["num_experts"] == 4
    assert info["fac"]["resident"] and info["fac"]["bytes"] > 0
    # only the LoRA-expert banks hold pool slots
    assert registry.pool.slots_used == banks["dyn"].num_experts() + banks["mix"].num_experts()


def test_k_equals_e_gives_the_base_model_tokens(served):
    engine, _, _ = served
    for i, p in enumerate(_prompts(engine, 3)):
        assert _run(engine, "full", p, f"f{i}") == _run(engine, None, p, f"b{i}")


def test_k_below_e_equals_the_standalone_factor_reference(served):
    engine, registry, banks = served
    model = engine.model
    for name in ("fac", "fac1"):
        weights = load_factor_weights(banks[name], model)
        prompts = _prompts(engine, 3, seed=1)
        want = greedy_decode(model, prompts, MAX, lambda seq_of: FactorStep(weights))
        got = [_run(engine, name, p, f"{name}{i}") for i, p in enumerate(prompts)]
        assert got == want
        served_logits = flat_logits(model, registry, [torch.tensor(p) for p in prompts], [name] * 3)
        for a, b, base in zip(served_logits, _logits(model, prompts, FactorStep(weights)), _logits(model, prompts)):
            _close(a, b)
            assert not torch.allclose(a, base, atol=1e-3)  # the bank really changes the model


def test_factor_plus_lora_bank_equals_factor_step_with_the_bank_inside(served):
    engine, registry, banks = served
    model = engine.model
    weights = load_factor_weights(banks["fac"], model)
    prompt = _prompts(engine, 1, seed=2)[0]
    h = registry.acquire("dyn")
    try:
        want = greedy_decode(model, [prompt], MAX,
                             lambda seq_of: FactorStep(weights, inner=registry.build_step([h], [seq_of.numel()])))
    finally:
        registry.release(h)
    assert _run(engine, "fac+dyn", prompt) == want[0]
    # the logits, and the bank on top really does something on top of the factor bank
    prompts = _prompts(engine, 3, seed=5)
    got = flat_logits(model, registry, [torch.tensor(p) for p in prompts], ["fac+dyn", "fac", "dyn"])
    h = registry.acquire("dyn")
    try:
        _close(got[0], _logits(model, prompts[:1], FactorStep(weights, inner=registry.build_step([h], [len(prompts[0])])))[0])
    finally:
        registry.release(h)
    alone = flat_logits(model, registry, [torch.tensor(prompts[0])] * 2, ["fac", "dyn"])
    assert not torch.allclose(got[0], alone[0], atol=1e-3) and not torch.allclose(got[0], alone[1], atol=1e-3)


def test_mixed_batch_equals_each_request_alone(served):
    engine, registry, _ = served
    names = ["fac", None, "dyn", "fac+dyn", "fac1", "full", "mix", "fac1+dyn", "fac", None, "fac+dyn"]
    prompts = _prompts(engine, len(names), seed=3)
    requests = [greedy_request(f"r{i}", p, b, MAX) for i, (p, b) in enumerate(zip(prompts, names))]
    together = engine.generate(requests)
    for r in requests:
        assert tokens_of(together[r.request_id]) == _run(engine, r.bank, r.prompt_token_ids, "alone"), r.bank
    assert all(v.refs == 0 for v in registry._live)


def test_refused_combinations(served):
    engine, registry, _ = served
    for model, why in [("fac+mix", "both replace the FFN"), ("fac+full", "two factor banks"),
                       ("dyn+fac", "first bank must be a factor bank"), ("fac+dyn+dyn", "one bank, or"),
                       ("fac+", "one bank, or")]:
        with pytest.raises(BankCombinationRefused, match=why) as err:
            registry.acquire(model)
        assert err.value.status == 400
        with pytest.raises(BankCombinationRefused):
            engine.add_request(greedy_request("bad", [1, 2, 3], model, 2))
    with pytest.raises(UnknownBank, match="'nope'"):
        registry.acquire("fac+nope")
    assert all(v.refs == 0 for v in registry._live) and not engine.has_unfinished()


def test_unload_and_replace_keep_in_flight_requests_on_their_version(served, tiny_model_dir, tmp_path):
    engine, registry, banks = served
    cfg = engine.model_config
    registry.add_root(tmp_path)
    factor_bank(tiny_model_dir, cfg, 4, 2, seed=7, scale=1.5, name="tmp").save(tmp_path / "tmp")
    registry.load_sync("tmp", tmp_path / "tmp")
    prompts = _prompts(engine, 4, seed=4)
    names = ["tmp", "tmp+dyn", "tmp", None]
    expected = [_run(engine, b, p, f"e{i}") for i, (p, b) in enumerate(zip(prompts, names))]
    old = registry._current["tmp"]

    events = {}
    for i, (p, b) in enumerate(zip(prompts, names)):
        engine.add_request(greedy_request(f"s{i}", p, b, MAX))
        events[f"s{i}"] = []
    for _ in range(2):
        for e in engine.step():
            events[e.request_id].append(e)
    factor_bank(tiny_model_dir, cfg, 4, 2, seed=8, scale=1.5, name="tmp").save(tmp_path / "tmp2")
    registry.load_sync("tmp", tmp_path / "tmp2")  # replace, then unload, while s0..s2 run
    registry.unload_sync("tmp")
    with pytest.raises(UnknownBank):
        registry.acquire("tmp")
    with pytest.raises(UnknownBank):
        registry.acquire("tmp+dyn")
    assert old.refs == 3 and old.factor is not None
    while engine.has_unfinished():
        for e in engine.step():
            events[e.request_id].append(e)
    for i in range(4):
        assert not any(e.error for e in events[f"s{i}"])
        assert tokens_of(events[f"s{i}"]) == expected[i]
    assert old.refs == 0 and old.factor is None and old not in registry._live
    assert all(v.name != "tmp" for v in registry._live)


def test_registry_with_the_model_given_and_without_one(served, tiny_model_dir):
    engine, _, _ = served
    cfg = engine.model_config
    bank = factor_bank(tiny_model_dir, cfg, 4, 2)
    reg = BankRegistry(cfg)
    reg.add(bank)
    with pytest.raises(UnknownBank, match="not ready"):  # no model to pack its experts from
        reg.acquire("fac")
    assert reg.list()[0]["resident"] is False
    reg.attach_model(engine.model)
    reg.release(reg.acquire("fac"))
    given = BankRegistry(cfg, model=engine.model)
    given.add(bank)
    assert given.list()[0]["resident"] and given.pool.slots_used == 0
    prompt = _prompts(engine, 1)[0]
    _close(flat_logits(engine.model, given, [torch.tensor(prompt)], ["fac"])[0],
           flat_logits(engine.model, reg, [torch.tensor(prompt)], ["fac"])[0])


def test_api_resolves_combined_names_and_answers_400_for_refused_ones(served):
    from types import SimpleNamespace

    from server.api.errors import APIError, from_exception
    from server.api.serving_engine import OpenAIServing

    _, registry, _ = served
    serving = OpenAIServing.__new__(OpenAIServing)  # resolve_bank reads only ctx
    serving.ctx = SimpleNamespace(model_name="base", banks=registry)
    assert serving.resolve_bank("fac+dyn") == "fac+dyn" and serving.resolve_bank("fac") == "fac"
    assert serving.resolve_bank("base") is None
    with pytest.raises(APIError) as err:
        serving.resolve_bank("fac+nope")
    assert err.value.status == 404
    with pytest.raises(BankCombinationRefused) as refused:
        registry.acquire("fac+mix")
    api = from_exception(refused.value)
    assert (api.status, api.code, api.param) == (400, "bank_combination_refused", "model")
    assert "both replace the FFN" in api.message


def test_factor_routing_statistics(served):
    """A factor bank reports its routing like any routed bank: per factorised layer ("mlp"), each of its
    tokens picks exactly K of E experts; the chosen experts are those of the router's top-k."""
    engine, registry, banks = served
    handles = [n and registry.acquire(n) for n in ("fac", "fac1", None, "fac")]
    step = registry.build_step(handles, [3, 2, 4, 1])
    prompts = [[5, 9, 13], [7, 8], [1, 2, 3, 4], [11]]
    _logits(engine.model, prompts, step)
    stats = step.routing_stats()
    fac, fac1 = stats.banks["fac"], stats.banks["fac1"]
    layers = engine.model_config.num_hidden_layers
    assert fac.tokens == 4 and fac.decisions == 4 * layers and fac.broadcast == 0
    assert torch.as_tensor(fac.experts_per_decision).tolist() == [0, 0, 4 * layers]  # always K = 2
    assert set(fac.selections) == {(i, "mlp") for i in range(layers)}
    assert all(int(v.sum()) == 4 * 2 for v in fac.selections.values())
    assert fac1.tokens == 2 and fac1.decisions == 2 and set(fac1.selections) == {(1, "mlp")}  # layer 1 only
    # the counts are the router's top-k of the tokens' FFN inputs: check layer 0 of "fac" by hooking its input
    seen = {}
    mlp0 = engine.model.layers[0].mlp
    hook = mlp0.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    try:
        step2 = registry.build_step(handles, [3, 2, 4, 1])
        _logits(engine.model, prompts, step2)
    finally:
        hook.remove()
    x = seen["x"]
    fac_rows = torch.tensor([0, 1, 2, 9])
    router = banks["fac"].layers[0].block_router
    top = (x[fac_rows].float() @ router.t()).topk(2, dim=-1).indices
    assert torch.equal(step2.routing_stats().banks["fac"].selections[(0, "mlp")], torch.bincount(top.reshape(-1), minlength=4))
    only = [registry.acquire("fac") for _ in range(2)]  # the whole batch on one factor bank: the one-call path
    step3 = registry.build_step(only, [3, 2])
    _logits(engine.model, prompts[:2], step3)
    s3 = step3.routing_stats()
    assert s3.banks["fac"].decisions == 5 * layers
    assert all(int(v.sum()) == 5 * 2 for v in s3.banks["fac"].selections.values())
    from server.metrics import ServerMetrics
    from tests.server.test_metrics import samples, step as step_stats
    m = ServerMetrics("base")
    m.on_step(step_stats(routing=s3))
    sel = {k: v for k, v in samples(m).items() if k[0] == "moleserve_expert_selections_total"}
    assert sum(sel.values()) == 5 * 2 * layers and all(dict(k[1])["target"] == "mlp" for k in sel)
    for h in handles + only:
        registry.release(h)  # None: a no-op
