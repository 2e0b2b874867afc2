"""The decode graph runner's static-buffer region with the Triton attention backend (interpreted on
the CPU): the static longest context (every row's table as wide as max_model_len) and padding rows
give the same logits as the torch reference backend."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("server.engine.paged_attention_triton")

from server.engine.cuda_graphs import DecodeGraphRunner, forbid_host_syncs
from server.engine.kv_cache import KVCache
from server.model import load_model


def test_triton_backend_static_region_matches_torch(tiny_model_dir):
    model = load_model(tiny_model_dir)
    cfg = model.config
    cache = KVCache(cfg, num_blocks=12, block_size=16, device=model.device, dtype=model.dtype)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    step = ([7, 8, 9], [40, 3, 17], [[4, 1, 6], [2], [9, 10]])  # 3 rows: padded to 4
    logits = {}
    for backend in ("torch", "triton"):
        runner = DecodeGraphRunner(model, cache, backend, batch_sizes=[1, 4], max_blocks=-(-512 // 16))
        size = runner.copy_in(*step)
        with torch.inference_mode(), forbid_host_syncs():
            logits[backend] = runner._forward(size)[:3].clone()
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
