"""The encoder cache's bound and order; the routing flag's validation."""

from __future__ import annotations

import pytest
import torch

from server.multimodal.encoder_cache import EncoderCache


def test_lru_within_a_byte_budget():
    cache = EncoderCache(max_bytes=3 * 40)  # three tensors of 10 float32
    for k in "abc":
        cache.put(k, torch.zeros(10))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", torch.zeros(10))
    assert "b" not in cache and all(k in cache for k in "acd") and cache.bytes == 120
    cache.put("big", torch.zeros(31))  # larger than the whole budget: not kept, nothing evicted
    assert "big" not in cache and len(cache) == 3
    cache.put("a", torch.zeros(20))  # replacing counts the new size once
    assert cache.bytes <= 120 and cache.get("a").numel() == 20
    assert cache.get("nope") is None and cache.misses == 1 and cache.hits == 2


def test_visual_routing_is_validated_once_at_the_edge():
    from server.engine.config import EngineConfig, EngineConfigError
    from server.settings import Settings

    assert Settings(visual_routing="TopK:2").visual_routing == "topk:2"
    with pytest.raises(ValueError, match="visual routing"):
        Settings(visual_routing="topk:0")
    with pytest.raises(EngineConfigError, match="visual routing"):
        EngineConfig(model="x", visual_routing="sparse")
