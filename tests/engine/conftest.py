"""Engine test helpers: a shared tiny model/tokenizer and an engine factory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from server.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from server.engine.llm_engine import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def make_engine(tiny_model_dir, tiny_model, tiny_tokenizer):
    """make_engine(**config overrides) -> LLMEngine on the tiny model (loaded once per session)."""
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    def make(model=None, tokenizer=None, model_dir=None, **overrides):
        overrides.setdefault("kv_cache_memory", 8 << 20)
        cfg = EngineConfig(model=model_dir or tiny_model_dir, device="cpu", **overrides)
        return LLMEngine(cfg, model=model or tiny_model, tokenizer=tokenizer or tiny_tokenizer)

    return make
