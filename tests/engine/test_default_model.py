"""End to end on the real default model: the engine's greedy tokens equal transformers' generate."""

from __future__ import annotations

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.protocol import GenerationRequest, SamplingParams

TEXTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
    "List three colors:", "Translate to French: I like apples.", "1, 2, 3, 4,",
    "The quick brown fox", "Water boils at", "Write a haiku about winter.",
    "In machine learning, overfitting means", "SELECT * FROM", "The largest planet in our solar system",
    "Hello, my name is", "import numpy as np\n", "Q: What is 12 times 12?\nA:",
    "A long time ago in a galaxy far, far away, there lived a young farmer who dreamed of the stars and",
]


@pytest.mark.slow
def test_16_concurrent_equal_one_at_a_time_and_transformers(default_model_dir):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=default_model_dir, device="cpu", dtype="float32", kv_cache_memory=256 << 20))
    prompts = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) > 8  # different prompt lengths
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

    def run(reqs):
        out = engine.generate(reqs)
        return [[t for e in out[r.request_id] for t in e.token_ids] for r in reqs]

    concurrent = run([GenerationRequest(f"c{i}", p, params) for i, p in enumerate(prompts)])
    engine.scheduler.max_num_seqs = 1  # the same requests, one at a time
    alone = run([GenerationRequest(f"a{i}", p, params) for i, p in enumerate(prompts)])
    assert concurrent == alone

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for p, got in zip(prompts, concurrent):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None)[0, len(p):]
            assert got == ref.tolist()
