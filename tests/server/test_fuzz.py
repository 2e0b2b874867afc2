"""Schema fuzzing of the OpenAPI spec with schemathesis: whatever a client sends, never a 5xx.

Runs against the fake engine (a short context so generated requests stay quick) with both keys
set, so the bank routes are fuzzed too (their registry refuses paths outside its root)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from server.api.app import create_app
from server.settings import Settings
from tests.server.conftest import ServerThread
from tests.server.fake_engine import FakeBanks, FakeEngine

KEY = "fuzz-admin"


@pytest.fixture(scope="module")
def fuzz_server(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-banks")
    banks = FakeBanks(root)
    engine = FakeEngine(tokenizer, max_model_len=64, max_running=8, max_waiting=64, step_s=0.0005, banks=banks)
    app = create_app(Settings(api_key="fuzz-user", admin_key=KEY, max_request_bytes=65536), engine, banks=banks)
    with ServerThread(app) as st:
        yield f"http://127.0.0.1:{st.port}"


def test_no_server_errors(fuzz_server):
    # schemathesis' pytest plugin predates this pytest; its schema and strategies are driven directly.
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: dict[str, set[int]] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            r = case.call_and_validate(base_url=fuzz_server, headers={"Authorization": f"Bearer {KEY}"},
                                       checks=[not_a_server_error], timeout=30)
            statuses.setdefault(op.label, set()).add(r.status_code)

        fuzz()
    # the generated bodies got through auth and validation to the engine, and were refused too
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert 200 in statuses[label] and statuses[label] & {400, 422}, (label, statuses[label])


@pytest.fixture(scope="module")
def real_fuzz_server(tiny_model_dir, tmp_path_factory):
    """The real engine (the tiny random model, a 64-token context) with a real bank registry."""
    from adapters.runtime import BankRegistry
    from server.engine.async_engine import AsyncEngine
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    root = tmp_path_factory.mktemp("real-fuzz-banks")
    config = EngineConfig(model=tiny_model_dir, device="cpu", kv_cache_memory=8 << 20, max_model_len=64,
                          max_num_seqs=8, max_waiting=64)
    llm = LLMEngine(config)
    registry = BankRegistry(llm.model_config, allowed_roots=[root], load_timeout=10)
    llm.set_adapter_provider(registry)
    app = create_app(Settings(api_key="fuzz-user", admin_key=KEY, max_request_bytes=65536, max_tokens_default=8),
                     AsyncEngine(config, engine=llm), banks=registry)
    with ServerThread(app) as st:
        yield f"http://127.0.0.1:{st.port}"


def test_no_server_errors_against_the_real_engine(real_fuzz_server):
    """The same fuzzing, bounded (a few examples per route), through tokenization, the scheduler,
    the model and the sampler of the real engine."""
    schema = schemathesis.openapi.from_url(real_fuzz_server + "/openapi.json")
    statuses: dict[str, set[int]] = {}
    for op in [result.ok() for result in schema.get_all_operations()]:

        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            r = case.call_and_validate(base_url=real_fuzz_server, headers={"Authorization": f"Bearer {KEY}"},
                                       checks=[not_a_server_error], timeout=60)
            statuses.setdefault(op.label, set()).add(r.status_code)

        fuzz()
    assert statuses["POST /v1/completions"] & {200, 400, 422}
