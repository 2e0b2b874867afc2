"""The serving engine: paged KV cache, continuous batching with chunked prefill, sampling, streaming.

Layout (one concept per file): ``config`` (EngineConfig), ``sequence``, ``block_manager``,
``kv_cache``, ``paged_attention`` (+ its C++ CPU kernel), ``scheduler``, ``model_runner``,
``sampler``, ``detokenizer``, ``output_processor``, ``llm_engine`` (the synchronous step loop) and
``async_engine`` (what the HTTP layer uses). ``protocol`` is the interface.
"""

from .config import EngineConfig, EngineConfigError

__all__ = ["AsyncEngine", "EngineConfig", "EngineConfigError", "LLMEngine"]


def __getattr__(name):  # the engines pull in torch/transformers: import them on first use
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine

        return AsyncEngine
    if name == "LLMEngine":
        from .llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
