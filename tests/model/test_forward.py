"""Our flat-batch forward equals transformers' on the same folder (fp32, max abs over the vocab)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.model import SequenceKVCache, StepContext, load_model, step_context
from server.model.generate import greedy_generate
from tests.conftest import make_tiny_model

LENGTHS = (1, 5, 17, 40)
TOL = 1e-4


def _flat_logits(model, prompts: list[torch.Tensor]) -> torch.Tensor:
    cache = SequenceKVCache(model.config)
    step = cache.step(list(range(len(prompts))), [len(p) for p in prompts])
    with torch.no_grad(), step_context(StepContext(positions=step.positions(), attention=step)):
        return model(torch.cat(prompts))


def _check_against_hf(folder, lengths=LENGTHS, seed=0):
    ours = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=gen) for n in lengths]
    refs = []
    with torch.no_grad():
        for p in prompts:
            refs.append(hf(p[None]).logits[0])
    # one at a time
    for p, ref in zip(prompts, refs):
        assert (_flat_logits(ours, [p]) - ref).abs().max().item() < TOL
    # packed together in one flat batch
    packed = _flat_logits(ours, prompts)
    for got, ref in zip(packed.split(list(lengths)), refs):
        assert (got - ref).abs().max().item() < TOL
    # incremental decode through the cache equals the full forward
    cache = SequenceKVCache(ours.config)
    ids = list(range(len(prompts)))
    step = cache.step(ids, [len(p) - 1 if len(p) > 1 else 1 for p in prompts])
    first = torch.cat([p[:-1] if len(p) > 1 else p for p in prompts])
    with torch.no_grad(), step_context(StepContext(positions=step.positions(), attention=step)):
        ours(first)
    multi = [i for i, p in enumerate(prompts) if len(p) > 1]
    step = cache.step(multi, [1] * len(multi))
    with torch.no_grad(), step_context(StepContext(positions=step.positions(), attention=step)):
        last = ours(torch.stack([prompts[i][-1] for i in multi]))
    for row, i in enumerate(multi):
        assert (last[row] - refs[i][-1]).abs().max().item() < TOL


def test_tiny_llama_matches_transformers(tiny_model_dir):
    _check_against_hf(tiny_model_dir)


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),
    ("mistral", {"sliding_window": 8}),
    ("llama", {"tie_word_embeddings": False, "attention_bias": True, "head_dim": 32}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
])
def test_llama_family_variants_match_transformers(tmp_path, default_model_dir, model_type, extra):
    folder = make_tiny_model(tmp_path / model_type, default_model_dir, model_type=model_type, seed=1, **extra)
    _check_against_hf(folder, lengths=(3, 20))


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_dir):
    _check_against_hf(default_model_dir, lengths=(1, 9, 64))


@pytest.mark.slow
def test_default_model_greedy_equals_transformers_generate(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ours = load_model(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [tok(p)["input_ids"] for p in prompts]
    got = greedy_generate(ours, ids, 12)
    for p, g in zip(ids, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(p):]
        assert g == ref.tolist()
