"""The model-server protocol of the Gateway API inference extension, checked the way its endpoint
picker reads it (tests/server/picker.py follows the picker's Go code): a real engine on the tiny
model with two banks, scraped while requests run and wait."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.settings import Settings
from tests.server.conftest import ServerThread, wait_until
from tests.server.picker import lora_affinity_score, parse


@pytest.fixture(scope="module")
def banks_dir(tiny_model_dir, tmp_path_factory):
    from adapters.storage import save_bank
    from tests.adapters.bank_builders import fingerprint_of, random_bank

    root = tmp_path_factory.mktemp("picker-banks")
    for i, name in enumerate(("alpha", "beta")):
        save_bank(random_bank("dynmole", fingerprint_of(tiny_model_dir), seed=i, name=name), root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, banks_dir):
    from server.api.app import create_app
    from server.commands.serve import build_engine

    # one sequence at a time, so a second request waits
    settings = Settings(model=str(tiny_model_dir), banks=banks_dir, max_num_seqs=1, kv_cache_memory=4 << 20,
                        max_model_len=512)
    engine, banks = build_engine(settings)
    app = create_app(settings, engine, banks)
    with ServerThread(app) as st:
        yield dict(url=f"http://127.0.0.1:{st.port}", engine=engine, model=app.state.model_name)


def scrape(url: str):
    text = httpx.get(url + "/metrics", timeout=10).text
    return parse(text), text


def test_idle_server_as_the_picker_sees_it(server):
    m, text = scrape(server["url"])
    engine = server["engine"]
    assert m.cache_block_size == engine.kv_block_size == 16
    assert m.cache_num_blocks == engine.kv_blocks_total > 0
    assert m.max_active_models == 1  # max_num_seqs = 1: one bank per step
    assert m.active_models == m.waiting_models == set()
    assert m.waiting_queue_size == m.running_requests_size == 0 and m.kv_cache_usage_percent == 0
    # vLLM's label set and value on the info gauge
    assert 'vllm:cache_config_info{block_size="16",cache_dtype="float32",num_gpu_blocks=' in text


def test_running_and_waiting_banks_drive_the_lora_affinity_score(server):
    url = server["url"]
    body = dict(prompt="hello", max_tokens=400, ignore_eos=True, stream=True, temperature=0)
    first_chunks = [threading.Event(), threading.Event()]
    stop = threading.Event()

    def stream(model: str, i: int) -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "model": model}, timeout=60) as r:
            for _ in r.iter_lines():
                first_chunks[i].set()
                if stop.is_set():
                    return

    before = max(s for s in [_lora_value(scrape(url)[1])])
    threads = [threading.Thread(target=stream, args=("alpha", 0), daemon=True)]
    threads[0].start()
    wait_until(lambda: scrape(url)[0].active_models == {"alpha"}, 20, "alpha running")
    # the second bank's request waits: one sequence at a time
    threads.append(threading.Thread(target=stream, args=("beta", 1), daemon=True))
    threads[1].start()
    wait_until(lambda: scrape(url)[0].waiting_models == {"beta"}, 20, "beta waiting")
    m, text = scrape(url)
    assert m.active_models == {"alpha"} and m.running_requests_size == 1 and m.waiting_queue_size == 1
    assert m.kv_cache_usage_percent > 0
    assert _lora_value(text) > before  # the value is the time of the last change
    # max_lora = 1 and two banks present: only the running bank's pod is suitable
    assert lora_affinity_score(m, "alpha") == 1.0
    assert lora_affinity_score(m, "beta") == 0.6
    assert lora_affinity_score(m, "gamma") == 0.0
    stop.set()
    for t in threads:
        t.join(timeout=30)
    wait_until(lambda: scrape(url)[0].active_models == set() and scrape(url)[0].waiting_models == set(), 20, "idle")
    idle = scrape(url)[0]
    assert lora_affinity_score(idle, "gamma") == 0.8  # room for one more bank


def _lora_value(text: str) -> float:
    [line] = [x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{")]
    return float(line.rsplit(" ", 1)[1])


def test_models_list_banks_with_the_base_model_as_parent(server):
    data = httpx.get(server["url"] + "/v1/models", timeout=10).json()["data"]
    base = server["model"]
    assert data[0]["id"] == base and data[0]["parent"] is None
    assert {d["id"]: d["parent"] for d in data[1:]} == {"alpha": base, "beta": base}
    assert all(d["root"] == base for d in data)


def test_max_lora_with_a_pool_budget(tiny_model_dir):
    from adapters.runtime.registry import BankRegistry
    from server.model import ModelConfig
    from tests.adapters.bank_builders import fingerprint_of, random_bank

    config = ModelConfig.from_folder(tiny_model_dir)
    bank = random_bank("dynmole", fingerprint_of(tiny_model_dir), name="a")
    unbounded = BankRegistry(config)
    unbounded.add(bank)
    assert unbounded.max_resident(64) == 64
    probe = BankRegistry(config)
    size = probe.add(bank)["bytes"]
    budgeted = BankRegistry(config, pool_memory_bytes=3 * size + 1)
    assert budgeted.max_resident(64) == 64  # nothing loaded yet: no size to divide by
    budgeted.add(bank)
    assert budgeted.max_resident(64) == 3 and budgeted.max_resident(2) == 2
