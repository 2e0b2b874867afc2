"""Banks loaded on demand and kept resident within bounds (issue #17): ``<root>/<name>`` loaded by
the first request naming it, one shared load, 404 for no folder, failures remembered, at most
``max_loaded`` banks in host memory (idle, unpinned, least recently used evicted first), a bank
with requests in flight never evicted, evicted banks reloaded with the same answers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import tracemalloc

import pytest
import torch

import adapters.runtime.registry as registry_module
from adapters.runtime import BankRegistry
from adapters.runtime.registry import BankHostFull, BankLoadError, BankNotOnDisk
from server.model import ModelConfig
from tests.adapters.bank_builders import fingerprint_of, random_bank
from tests.runtime.helpers import greedy_request, make_engine, tokens_of


def _bank(model_dir, folder, name, seed, version="1"):
    bank = random_bank("dynmole", fingerprint_of(model_dir), r=4, experts_per_layer=(3,), seed=seed, name=name)
    bank.version = version
    bank.save(folder)
    return folder


@pytest.fixture
def root(tmp_path, tiny_model_dir):
    r = tmp_path / "banks"
    for i in range(4):
        _bank(tiny_model_dir, r / f"b{i}", f"b{i}", seed=i)
    return r


def _registry(model_dir, roots, **kw) -> BankRegistry:
    kw.setdefault("on_demand", True)
    reg = BankRegistry(ModelConfig.from_folder(model_dir), allowed_roots=roots, **kw)
    reg.on_demand_hold = 0.0  # evictable at once: these tests drive the order of loads and requests themselves
    return reg


def _names(reg, tier=None):
    return sorted(b["name"] for b in reg.list() if tier is None or b["tier"] == tier)


def test_concurrent_requests_share_one_load_and_missing_names_are_404(root, tiny_model_dir):
    reg = _registry(tiny_model_dir, [root])

    async def main():
        await asyncio.gather(*(reg.ensure("b0") for _ in range(8)))
        for bad in ("nope", "../b0", "a/b", ".hidden", "b0/..", "x..y"):
            with pytest.raises(BankNotOnDisk) as info:
                await reg.ensure(bad)
            assert info.value.status == 404 and info.value.param == "model"

    asyncio.run(main())
    stats = reg.residency_stats()
    assert stats.loads[("on_demand", "ok")] == 1 and stats.load_count == 1
    assert _names(reg) == ["b0"] and reg.list()[0]["pinned"] is False
    assert stats.misses["host"] == 8 + 6 and stats.resident["host"] == 1
    # a folder that appears later is found: the negative entry goes stale when the root changes
    _bank(tiny_model_dir, root / "nope", "nope", seed=9)
    asyncio.run(reg.ensure("nope"))
    assert "nope" in _names(reg)


def test_a_failed_load_is_a_4xx_naming_the_file_and_is_not_retried_until_the_files_change(root, tiny_model_dir,
                                                                                            monkeypatch):
    (root / "b1" / "bank.json").write_text("{not json")
    calls = []
    real = registry_module.load_bank
    monkeypatch.setattr(registry_module, "load_bank", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    reg = _registry(tiny_model_dir, [root])
    for _ in range(5):
        with pytest.raises(BankLoadError, match="bank.json") as info:
            asyncio.run(reg.ensure("b1"))
        assert 400 <= info.value.status < 500 and info.value.param == "model"
    assert len(calls) == 1  # remembered: the broken files are not read again on every request
    _bank(tiny_model_dir, root / "b1", "b1", seed=1)  # repaired: the folder changed
    asyncio.run(reg.ensure("b1"))
    assert len(calls) == 2 and _names(reg) == ["b1"]


def test_a_failed_load_is_retried_after_the_ttl(root, tiny_model_dir):
    (root / "b1" / "weights.safetensors").write_bytes(b"garbage")
    reg = _registry(tiny_model_dir, [root], negative_ttl=0.2)
    with pytest.raises(BankLoadError):
        asyncio.run(reg.ensure("b1"))
    time.sleep(0.25)
    with pytest.raises(BankLoadError):
        asyncio.run(reg.ensure("b1"))
    assert reg.residency_stats().loads[("on_demand", "error")] == 2


def test_lru_idle_unpinned_banks_are_evicted_within_max_loaded(root, tiny_model_dir, tmp_path):
    reg = _registry(tiny_model_dir, [root, tmp_path], max_loaded=3)
    reg.load_sync("p", _bank(tiny_model_dir, tmp_path / "pinned", "p", seed=7))  # admin: pinned
    asyncio.run(reg.ensure("b0"))
    asyncio.run(reg.ensure("b1"))
    reg.release(reg.acquire("b0"))  # b0 used after b1: b1 is the least recently used
    asyncio.run(reg.ensure("b2"))
    assert _names(reg) == ["b0", "b2", "p"]
    assert [(b["name"], b["tier"]) for b in reg.list_on_disk()] == [("b1", "disk")]
    asyncio.run(reg.ensure("b3"))
    asyncio.run(reg.ensure("b1"))  # evicted banks come back on their next request
    assert "p" in _names(reg) and len(reg.list()) == 3
    stats = reg.residency_stats()
    assert stats.evictions["host"] == 3 and stats.resident == {"host": 3, "pool": 3, "disk": 2}
    assert reg.max_resident(64) == 3  # max_lora for the endpoint picker stays the bound


def test_a_bank_a_request_asks_for_counts_as_used(root, tiny_model_dir):
    """``ensure`` on a loaded bank (the request's hit, before it acquires the bank) makes it the most
    recently used: the next load evicts another bank, not the one the request is about to run on."""
    reg = _registry(tiny_model_dir, [root], max_loaded=2)
    asyncio.run(reg.ensure("b0"))
    asyncio.run(reg.ensure("b1"))
    asyncio.run(reg.ensure("b0"))  # a hit: b1 is now the least recently used
    asyncio.run(reg.ensure("b2"))
    assert _names(reg) == ["b0", "b2"]


def test_a_bank_with_requests_in_flight_is_never_evicted(root, tiny_model_dir):
    reg = _registry(tiny_model_dir, [root], max_loaded=2, load_timeout=0.5)
    asyncio.run(reg.ensure("b0"))
    h0 = reg.acquire("b0")
    asyncio.run(reg.ensure("b1"))
    asyncio.run(reg.ensure("b2"))  # b1 idle: evicted, b0 kept
    assert _names(reg) == ["b0", "b2"]
    h2 = reg.acquire("b2")
    t0 = time.monotonic()
    with pytest.raises(BankHostFull) as info:  # both busy: waits for one to go idle, up to the deadline
        asyncio.run(reg.ensure("b3"))
    assert info.value.status == 503 and time.monotonic() - t0 >= 0.45
    assert _names(reg) == ["b0", "b2"]

    async def waits_for_room():
        loading = asyncio.ensure_future(reg.ensure("b3"))
        await asyncio.sleep(0.1)
        assert not loading.done()
        reg.release(h2)  # b2 idle now: b3 takes its place
        await asyncio.wait_for(loading, 5)

    reg.load_timeout = 10
    asyncio.run(waits_for_room())
    assert _names(reg) == ["b0", "b3"]
    reg.release(h0)


def test_a_bank_loaded_on_demand_is_held_for_its_waiting_requests(root, tiny_model_dir):
    reg = _registry(tiny_model_dir, [root], max_loaded=1, load_timeout=5)
    reg.on_demand_hold = 0.5
    asyncio.run(reg.ensure("b0"))
    t0 = time.monotonic()
    asyncio.run(reg.ensure("b1"))  # b0 is held (its requests may not have acquired it yet): b1 waits
    assert time.monotonic() - t0 >= 0.4 and _names(reg) == ["b1"]


def test_all_pinned_refuses_at_once(root, tiny_model_dir, tmp_path):
    reg = _registry(tiny_model_dir, [root, tmp_path], max_loaded=1)
    reg.load_sync("p", _bank(tiny_model_dir, tmp_path / "p", "p", seed=5))
    with pytest.raises(BankHostFull, match="--max-loaded-banks"):
        asyncio.run(reg.ensure("b0"))


@torch.no_grad()
def test_a_bank_evicted_and_reloaded_answers_exactly_as_before(root, tiny_model_dir):
    reg = _registry(tiny_model_dir, [root], max_loaded=1, dtype=torch.float32)
    engine = make_engine(tiny_model_dir, reg)
    prompt = [5, 17, 42, 99, 7, 3]

    def run(bank, rid):
        asyncio.run(reg.ensure(bank))
        events = engine.generate([greedy_request(rid, prompt, bank, 8, logprobs=2)])[rid]
        return tokens_of(events), [lp for e in events for lp in (e.logprobs or [])]

    first = run("b0", "a")
    other = run("b1", "b")  # evicts b0 (host memory holds one bank)
    assert _names(reg) == ["b1"] and other[0] != first[0]
    again = run("b0", "c")  # loaded again from disk
    assert again[0] == first[0]
    assert [lp.logprob for lp in again[1]] == [lp.logprob for lp in first[1]]
    assert reg.residency_stats().loads[("on_demand", "ok")] == 3


def test_a_hot_replaced_bank_is_evicted_only_when_its_old_version_is_done(root, tiny_model_dir, tmp_path):
    reg = _registry(tiny_model_dir, [root, tmp_path], max_loaded=1, load_timeout=0.3)
    asyncio.run(reg.ensure("b0"))
    old = reg.acquire("b0")
    replacement = _bank(tiny_model_dir, tmp_path / "b0-v2", "b0", seed=11, version="2")
    reg.load_sync("b0", replacement, pinned=False)  # hot replace: the request keeps version 1
    assert reg.get("b0")["bank_version"] == "2" and reg.get("b0")["in_flight"] == 1
    with pytest.raises(BankHostFull):  # b0's old version still runs: b0 is not evicted
        asyncio.run(reg.ensure("b1"))
    reg.release(old)  # the old version is freed with its last request
    asyncio.run(reg.ensure("b1"))
    assert _names(reg) == ["b1"] and reg.pool_slots_used() == 3
    assert len(reg._live) == 1  # no retired version left holding memory
    asyncio.run(reg.ensure("b0"))  # back from where it was last loaded: the replacement, not <root>/b0
    assert reg.get("b0")["bank_version"] == "2" and reg.get("b0")["source"] == str(replacement.resolve())


def test_ten_thousand_distinct_names_leak_neither_memory_nor_file_handles(root, tiny_model_dir):
    reg = _registry(tiny_model_dir, [root])
    (root / "b3" / "bank.json").write_text(json.dumps({"kind": 5}))  # one broken bank among the names
    fds = len(os.listdir("/proc/self/fd"))

    async def flood(prefix, n):
        for i in range(n):
            name = "b3" if i % 1000 == 0 else f"{prefix}{i}"
            try:
                await reg.ensure(name)
            except (BankNotOnDisk, BankLoadError):
                pass

    tracemalloc.start()
    asyncio.run(flood("warm", 5_000))  # fills the negative cache to its bound (4096)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    asyncio.run(flood("name", 10_000))  # 10,000 more names: churn, not growth
    elapsed = time.perf_counter() - t0
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(reg._misses) <= reg._misses.capacity and not reg._loading
    assert grown < 256 << 10, grown
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert elapsed < 20, elapsed  # a few stats per name (tracemalloc slows it several times)
    assert reg.residency_stats().loads[("on_demand", "error")] == 1  # the broken bank: read once
    assert _names(reg) == []


def test_ecosystem_checkpoints_are_converted_once(root, tiny_model_dir, tmp_path, monkeypatch):
    from tests.adapters.bank_builders import write_peft_lora

    write_peft_lora(root / "peft", fingerprint_of(tiny_model_dir), targets=("q_proj", "down_proj"))
    calls = []
    real = registry_module.load_bank
    monkeypatch.setattr(registry_module, "load_bank", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    reg = _registry(tiny_model_dir, [root], convert_cache=tmp_path / "converted", max_loaded=1)
    asyncio.run(reg.ensure("peft"))
    first = reg._current["peft"].layout.packed
    asyncio.run(reg.ensure("b0"))  # evicts the converted bank
    asyncio.run(reg.ensure("peft"))  # back from the cache: no second conversion, the same weights
    again = reg._current["peft"].layout.packed
    assert [c[0].name for c in calls] == ["peft", "b0"]
    for site, (a, b, _) in first.linears.items():
        assert torch.equal(a, again.linears[site][0]) and torch.equal(b, again.linears[site][1])
    os.utime(root / "peft" / "adapter_config.json", ns=(1, 1))  # rewritten in place (mtime): converted again
    asyncio.run(reg.ensure("b0"))
    asyncio.run(reg.ensure("peft"))
    assert [c[0].name for c in calls] == ["peft", "b0", "b0", "peft"]
