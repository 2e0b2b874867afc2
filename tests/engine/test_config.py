"""EngineConfig validates each field once, with a message naming it."""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig, EngineConfigError


@pytest.mark.parametrize("field,value,match", [
    ("device", "tpu", "device"), ("dtype", "int8", "dtype"), ("block_size", 12, "block_size"),
    ("kv_cache_memory", 1.5, "kv_cache_memory"), ("kv_cache_memory", 0, "kv_cache_memory"),
    ("max_num_seqs", 0, "max_num_seqs"), ("max_num_batched_tokens", 0, "max_num_batched_tokens"),
    ("max_model_len", 1, "max_model_len"), ("max_waiting", 0, "max_waiting"),
])
def test_bad_values_are_refused(field, value, match):
    with pytest.raises(EngineConfigError, match=match):
        EngineConfig(model="m", **{field: value})


def test_defaults_resolve_on_cpu():
    import torch

    cfg = EngineConfig(model="m", device="cpu")
    dev = cfg.resolved_device()
    assert dev.type == "cpu" and cfg.resolved_dtype(dev) == torch.float32
    assert cfg.resolved_kv_cache_memory(dev) == 0.1
    assert EngineConfig(model="m", kv_cache_memory=1 << 20).resolved_kv_cache_memory(dev) == 1 << 20
