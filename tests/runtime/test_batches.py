"""Mixed-bank batches through the engine, and hot replace while requests stream."""

from __future__ import annotations

import threading

import torch

from adapters.runtime import BankRegistry
from tests.adapters.bank_builders import fingerprint_of, random_bank
from tests.runtime.helpers import greedy_request, make_engine, tokens_of

KINDS = ("lora", "mixlora", "dynmole", "mola")


def _banks(model_dir, seed=0):
    fp = fingerprint_of(model_dir)
    banks = []
    for i, kind in enumerate(KINDS):
        bank = random_bank(kind, fp, r=4 + 4 * (i % 2), experts_per_layer=(3 + i % 2, 2), seed=seed + i, name=kind)
        for layer in bank.layers:  # keep deltas moderate so greedy tokens are not near ties
            for ex in layer.linears.values():
                ex.lora_b.mul_(0.05)
        banks.append(bank)
    return banks


def test_mixed_batch_equals_each_request_alone(tiny_model_dir):
    engine = make_engine(tiny_model_dir, None)
    registry = BankRegistry(engine.model_config)
    for bank in _banks(tiny_model_dir):
        registry.add(bank)
    engine.set_adapter_provider(registry)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    requests = []
    for i, bank in enumerate([*KINDS, None, "dynmole", "mixlora"]):
        prompt = torch.randint(0, vocab, (3 + 2 * i,), generator=gen).tolist()
        requests.append(greedy_request(f"r{i}", prompt, bank, 6))
    together = engine.generate(requests)
    for r in requests:
        alone = engine.generate([greedy_request(r.request_id + "-alone", r.prompt_token_ids, r.bank, 6)])
        assert tokens_of(together[r.request_id]) == tokens_of(alone[r.request_id + "-alone"]), r.bank
    # different banks really do different things
    outs = {tokens_of(together[f"r{i}"]).__repr__() for i in range(5)}
    assert len(outs) > 1
    assert registry.pool.slots_used == sum(b.num_experts() for b in _banks(tiny_model_dir))


def test_hot_replace_keeps_running_requests_on_their_version(tiny_model_dir):
    engine = make_engine(tiny_model_dir, None)
    registry = BankRegistry(engine.model_config)
    old, new = _banks(tiny_model_dir, seed=0)[2], _banks(tiny_model_dir, seed=10)[2]  # dynmole
    registry.add(old, name="b")
    engine.set_adapter_provider(registry)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (5,), generator=gen).tolist() for _ in range(16)]
    expected_old = engine.generate([greedy_request(f"o{i}", p, "b", 8) for i, p in enumerate(prompts)])

    events: dict[str, list] = {}
    for i, p in enumerate(prompts):
        engine.add_request(greedy_request(f"s{i}", p, "b", 8))
        events[f"s{i}"] = []
    for _ in range(3):  # streaming on the old version
        for e in engine.step():
            events[e.request_id].append(e)
    loader = threading.Thread(target=registry.add, args=(new,), kwargs={"name": "b"})
    loader.start()
    while loader.is_alive():  # the engine keeps stepping while the new version loads
        for e in engine.step():
            events[e.request_id].append(e)
    loader.join()
    assert [v["version"] for v in registry.list()] == [2]
    engine.add_request(greedy_request("fresh", prompts[0], "b", 8))
    events["fresh"] = []
    while engine.has_unfinished():
        for e in engine.step():
            events[e.request_id].append(e)
    for i in range(16):
        assert not any(e.error for e in events[f"s{i}"])
        assert tokens_of(events[f"s{i}"]) == tokens_of(expected_old[f"o{i}"])
    expected_new = engine.generate([greedy_request("n", prompts[0], "b", 8)])
    assert tokens_of(events["fresh"]) == tokens_of(expected_new["n"]) != tokens_of(expected_old["o0"])
    # the old version was freed when its last request finished
    assert registry.pool.slots_used == new.num_experts()
    assert len(registry._live) == 1
