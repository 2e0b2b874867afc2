"""The engine's configuration: one typed dataclass, validated once (the server maps its flags onto it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the value."""


@dataclass
class EngineConfig:
    """Everything the engine needs to start.

    model: a local Hugging Face Llama-family folder.
    device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    dtype: "float32", "bfloat16", "float16" or "auto" (float32 on CPU, bfloat16 on CUDA).
    quantization: the base weights: "none" (``dtype``), "int4" / "int8" (weight-only, see
        ``server.model.quantization``), or "auto" (the checkpoint's own quantized blocks when the
        folder has them, as the embedded default does; else none). The library default is none
        (exact weights, as the equivalence tests need); the server's (``Settings``) is auto.
    block_size: tokens per KV cache block.
    kv_cache_memory: bytes for the KV cache (int > 1), or a fraction (0, 1] of the memory that is
        free once the model is loaded (CUDA: free device memory; CPU: MemAvailable); None: 0.8 on
        CUDA, 0.1 on CPU (whose memory the OS and other processes share). The cache is never larger
        than what ``max_num_seqs`` sequences of ``max_model_len`` tokens can use.
    max_num_seqs: most sequences in one step's batch.
    max_num_batched_tokens: most tokens (decode + prefill chunks) in one step's batch.
    long_prefill_token_threshold: most prompt tokens one sequence prefills in a step while other
        sequences share the engine (vLLM's flag); 0: no cap; None: a quarter of max_num_batched_tokens.
    max_model_len: longest sequence (prompt + output); None: the model's max_position_embeddings.
    max_waiting: most requests waiting for admission; beyond it ``submit`` raises EngineOverloaded.
    seed: seeds the generator used by unseeded sampling requests.
    vision_tower: a local transformers folder of a vision tower (CLIP, SigLIP, Dinov2): the tower of a
        Parrot checkpoint (wins over its ``mm_vision_tower``), or a tower for a Llama-family model
        (images then need a ``parrot`` bank).
    visual_routing: the visual mixture's routing, ``dense`` (the release), ``topk:K`` or ``dynmole``.
    encoder_cache_memory: bytes of tower + projector outputs kept by image content hash.
    enable_prefix_caching: reuse the KV blocks of equal prompt prefixes (same tokens, same bank
        version) across requests (``block_manager.py``).
    enforce_eager: never capture CUDA graphs (vLLM's flag); on CUDA, decode steps of at most
        ``cuda_graph_max_batch`` sequences (and ``max_num_seqs``) otherwise replay graphs
        captured at start (``cuda_graphs.py``).
    cuda_graph_max_batch: the largest decode batch captured (sizes 1, 2, 4, 8, 16, 24, ... up to it).
    """

    model: str | Path
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None
    max_waiting: int = 1024
    seed: int = 0
    vision_tower: str | Path | None = None
    visual_routing: str = "dense"
    encoder_cache_memory: int = 256 << 20
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise EngineConfigError(msg)

        need(self.device == "auto" or self.device == "cpu" or str(self.device).startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.dtype == "auto" or self.dtype in _DTYPES,
             f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        need(self.quantization in ("auto", "none", "int8", "int4"),
             f"quantization must be auto, none, int8 or int4, got {self.quantization!r}")
        need(isinstance(self.block_size, int) and self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
             f"block_size must be a positive power of two, got {self.block_size!r}")
        mem = self.kv_cache_memory
        need(mem is None or isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0
             and (isinstance(mem, int) or mem <= 1),
             f"kv_cache_memory must be bytes (int) or a fraction in (0, 1], got {mem!r}")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        need(self.long_prefill_token_threshold is None or self.long_prefill_token_threshold >= 0,
             f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        need(self.max_model_len is None or self.max_model_len >= 2, f"max_model_len must be >= 2, got {self.max_model_len}")
        need(self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}")
        need(isinstance(self.cuda_graph_max_batch, int) and self.cuda_graph_max_batch >= 1,
             f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch!r}")
        need(isinstance(self.encoder_cache_memory, int) and self.encoder_cache_memory >= 0,
             f"encoder_cache_memory must be bytes >= 0, got {self.encoder_cache_memory!r}")
        from adapters.parrot import VisualRouting  # noqa: PLC0415

        try:
            VisualRouting.parse(str(self.visual_routing))
        except ValueError as exc:
            raise EngineConfigError(str(exc)) from None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError(f"device {self.device!r} requested but CUDA is not available")
        return device

    def resolved_long_prefill_token_threshold(self) -> int:
        if self.long_prefill_token_threshold is None:
            return max(1, self.max_num_batched_tokens // 4)
        return self.long_prefill_token_threshold

    def resolved_kv_cache_memory(self, device: torch.device) -> int | float:
        if self.kv_cache_memory is None:
            return 0.8 if device.type == "cuda" else 0.1
        return self.kv_cache_memory

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
