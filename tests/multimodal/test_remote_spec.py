"""The Ray Serve ingress renders image prompts as the standalone server does: its ``RemoteEngine``
publishes the replicas' ``MultiModalSpec`` (which crosses the process boundary pickled)."""

from __future__ import annotations

import asyncio
import pickle

import torch
from PIL import Image

from server.distributed.remote_engine import RemoteEngine

from .helpers import make_engine


class _Describe:
    def __init__(self, info):
        self.info = info

    async def remote(self):
        return pickle.loads(pickle.dumps(self.info))  # what Ray's serialisation does to it


class _Handle:
    def __init__(self, info):
        self.describe = _Describe(info)


def test_remote_engine_publishes_the_replicas_multimodal_spec(parrot_dir, parrot_model, parrot_tokenizer):
    engine = make_engine(parrot_dir, parrot_model, parrot_tokenizer)
    spec = engine.multimodal_spec
    assert spec is not None
    remote = RemoteEngine(_Handle({"tokenizer": None, "model_config": engine.model.config if hasattr(engine, "model")
                                   else None, "max_model_len": 64, "model_name": "p", "multimodal_spec": spec}), None)
    assert remote.multimodal_spec is None  # not started: no replica has answered
    asyncio.run(remote.start())
    got = remote.multimodal_spec
    assert (got.tokens_per_image, got.max_images, got.placeholder_token_id, got.needs_bank) == (
        spec.tokens_per_image, spec.max_images, spec.placeholder_token_id, spec.needs_bank)
    img = Image.new("RGB", (40, 23), (200, 10, 90))
    torch.testing.assert_close(got.processor(img), spec.processor(img), rtol=0, atol=0)
