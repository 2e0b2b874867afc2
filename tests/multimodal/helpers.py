"""Engine helpers for the multimodal tests: prompts with an image span, engines on the tiny Parrot."""

from __future__ import annotations

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine, load_tokenizer
from server.engine.protocol import GenerationRequest, SamplingParams
from server.multimodal import ImageInput

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def chat_pieces(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """The release's ChatML prompt tokenised in pieces split at <image> (no special tokens added):
    (ids before the image, ids after it)."""
    before = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
    after = tokenizer(f"\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    return list(before), list(after)


def image_request(rid: str, before: list[int], after: list[int], pixel_values, content_hash: str, n: int,
                  placeholder: int, *, bank: str | None = None, **params) -> GenerationRequest:
    params = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, **params}
    return GenerationRequest(rid, before + [placeholder] * n + after, SamplingParams(**params), bank=bank,
                             images=[ImageInput(pixel_values, content_hash, len(before), n)])


def make_engine(model_dir, loaded, tokenizer=None, **overrides) -> LLMEngine:
    llm, vision = loaded
    cfg = dict(model=model_dir, device="cpu", dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=16,
               max_num_batched_tokens=512)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model=llm, tokenizer=tokenizer or load_tokenizer(model_dir), vision=vision)


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.token_ids]
