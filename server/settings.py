"""The server's one typed settings object: defaults here, overridden by ``MOLESERVE_*`` environment
variables, overridden by ``moleserve serve`` flags (one flag per field, generated from this class).

    MOLESERVE_API_KEY=secret moleserve serve --port 9000 --bank-root /banks
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOLESERVE_", extra="ignore", protected_namespaces=())

    # Listening
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    # Model and banks
    model: str | None = Field(None, description="local Hugging Face folder of a Llama-family model or a Parrot (parrot_qwen2) checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    vision_tower: Path | None = Field(None, description="local transformers folder of a vision tower (CLIP, SigLIP, Dinov2): a Parrot checkpoint's (wins over its mm_vision_tower), or one for a Llama-family model, whose image requests then name a parrot bank")
    visual_routing: str = Field("dense", description="routing of Parrot's visual mixture: dense (the release: every expert), topk:K, or dynmole (only the chosen experts run)")
    encoder_cache_memory: int = Field(256 << 20, ge=0, description="bytes of vision tower + projector outputs kept by image content hash")
    served_model_name: str | None = Field(None, description="the base model's name in the API (default: the model folder's name)")
    banks: Path | None = Field(None, description="folder whose sub-folders are expert banks, all loaded at start")
    bank_root: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folder under which banks may be loaded at run time (repeatable; env: comma-separated); --banks is always allowed")

    bank_dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto", description="storage dtype of the expert weights in the bank pool (auto: int8 on the CPU when the "
        "base is served quantized, as the embedded default is; float16 for a float32 model on the CPU; each halves "
        "their memory and the bytes each step reads; otherwise the model's dtype); "
        "float32 keeps them exact; int8 (CPU only) stores each row as int8 with one fp32 scale, half float16's "
        "bytes, at ~1e-2 in log-probability from the fp32 references instead of ~1e-3")

    tool_call_parser: Literal["hermes", "none"] = Field(
        "hermes", description="how tool calls are read from chat outputs: hermes (<tool_call>{...}</tool_call>, "
        "Hermes and Qwen models) or none (the output stays text)")
    bank_memory: float | None = Field(
        None, gt=0, description="memory all loaded banks may hold together: bytes (> 1) or a fraction of the "
        "machine's memory (default: 0.25 of it); a load past it is refused with 409 naming the budget")
    bank_load_workers: int = Field(4, ge=1, le=64, description="bank loads that may run at once; beyond them: 503")
    bank_load_timeout: float = Field(120.0, gt=0, description="seconds a bank load may take before it is given up (504)")

    load_banks_on_demand: bool = Field(
        False, description="a request naming a bank that is not loaded loads the folder <root>/<name> from a "
        "--bank-root or --banks folder (no such folder: 404; a bank that fails to load: a 4xx naming the file, "
        "remembered for --bank-negative-ttl seconds or until the folder changes)")
    max_loaded_banks: int | None = Field(
        None, ge=1, description="banks host memory holds at once; loading one more evicts the least recently used "
        "idle bank that is not pinned (--banks and admin-API banks are pinned); default: unbounded")
    bank_pool_memory: float | None = Field(
        None, gt=0, description="bytes of the device expert pool (> 1, or a fraction of --bank-memory); idle banks "
        "leave it least recently used first (default: unbounded)")
    bank_negative_ttl: float = Field(30.0, gt=0, description="seconds a bank name that was not found or failed to "
                                     "load on demand is answered from memory")

    first_run_bank: bool = Field(
        False, description="train the small commonsense DynMoLE bank in the background if it is not cached yet, "
        "and load it as 'commonsense-dynmole' when ready (the server answers meanwhile)")

    # Auth
    api_key: SecretStr | None = Field(None, description="bearer token required on every route except /health, /ready (and /metrics)")
    admin_key: SecretStr | None = Field(None, description="bearer token for the bank routes; without it they do not exist")
    metrics_auth: bool = Field(False, description="require the API key on /metrics too")

    # Engine
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights and activations (auto: float32 on CPU, bfloat16 on CUDA)")
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto", description="base weights weight-only quantized: int4 (groups of 32 with scale and offset, as "
        "GGUF's Q4_1), int8 (per row), none (--dtype); auto: the checkpoint's own (the embedded default: its "
        "GGUF's Q4_1 blocks as stored), else none. The LM head is int8 when quantized; banks keep --bank-dtype")
    kv_cache_memory: float | None = Field(None, gt=0, description="KV-cache size: bytes (> 1) or a fraction of free memory (default: 0.8 CUDA, 0.1 CPU)")
    max_num_batched_tokens: int = Field(512, ge=1, description="most tokens (decode + prefill chunks) in one engine step")
    long_prefill_token_threshold: int | None = Field(
        None, ge=0, description="most prompt tokens one sequence prefills per step while others share the engine "
        "(decode tokens go first, waiting requests are admitted with the rest); 0: no cap; "
        "default: a quarter of --max-num-batched-tokens")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prompt prefixes already computed "
                                        "(same tokens, same bank version) across requests")

    enforce_eager: bool = Field(False, description="never capture CUDA graphs: every decode step runs eagerly "
                                "(default on CUDA: decode steps replay graphs captured at start)")
    cuda_graph_max_batch: int = Field(32, ge=1, description="largest decode batch captured as a CUDA graph (sizes 1, "
                                      "2, 4, 8, 16, 24, ... up to it); larger decode steps run eagerly")

    # Limits and backpressure
    max_num_seqs: int = Field(64, ge=1, description="sequences the engine runs at once")
    max_waiting: int = Field(256, ge=0, description="requests that may wait for a slot; beyond it: 429")
    max_model_len: int | None = Field(None, ge=16, description="context window (default: the model's max_position_embeddings)")
    max_prompts: int = Field(128, ge=1, description="most prompts in one /v1/completions request (one choice each)")
    max_n: int = Field(16, ge=1, description="largest n (choices per prompt) and best_of (samples per prompt) a request "
                       "may ask for; beyond it: 400 (the engine also caps them at max_num_seqs)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted; beyond it: 413")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503")
    max_tokens_default: int | None = Field(
        4096, ge=1, description="max_tokens of a request that omits it (never past the context window; "
        "unset: the rest of the context window)")
    max_tokens_limit: int | None = Field(None, ge=1, description="largest max_tokens a request may ask for; beyond it: "
                                         "400 (unset: the context window)")
    max_messages: int = Field(2048, ge=1, description="most messages in one chat request; beyond it: 400, "
                              "checked before the chat template runs")
    tokenizer_workers: int = Field(2, ge=1, le=64, description="threads that render chat templates and tokenize "
                                   "(each with its own tokenizer copy), so one large body does not delay the others")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers; "
                                  "then the connection is closed (slow-header clients cannot hold sockets)")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send a request's body; then 408")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(1024, ge=1, description="open connections (and requests) at once; beyond it: 503")
    grace_period: float = Field(30.0, ge=0, description="on SIGTERM, seconds in-flight requests may run before they are aborted")

    # Images (chat content parts of type image_url; server/multimodal/media.py)
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts http(s) image URLs may be fetched from (repeatable; env: comma-separated; default: none, "
        "remote images are refused)")
    allowed_local_media_path: Path | None = Field(
        None, description="folder file:// image URLs may read from (default: none, file:// is refused)")
    max_image_bytes: int = Field(20_000_000, ge=1024, description="largest encoded image accepted")
    max_image_pixels: int = Field(7680 * 4320, ge=1, description="largest image (width x height, read from its header "
                                  "before decoding) accepted: the guard against decompression bombs")
    media_fetch_timeout: float = Field(10.0, gt=0, description="seconds an http(s) image may take to download")

    @field_validator("visual_routing")
    @classmethod
    def _routing(cls, value: str) -> str:
        from adapters.parrot import VisualRouting  # noqa: PLC0415

        return str(VisualRouting.parse(value))

    @field_validator("bank_root", "allowed_media_domains", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p for p in value.split(",") if p.strip()]
        return value

    @field_validator("api_key", "admin_key", "model", "served_model_name", "banks", "max_tokens_default",
                     "max_tokens_limit", "vision_tower", "allowed_local_media_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @staticmethod
    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per settings field. Flags default to "unset" so that the environment and the
    class defaults (shown in --help) stay the one source of defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        default = field.get_default(call_default_factory=True)
        shown = "" if isinstance(default, SecretStr) or default in (None, []) else f" (default: {default})"
        help_text = f"{field.description}{shown}; env MOLESERVE_{name.upper()}"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif get_origin(annotation) is list:
            parser.add_argument(flag, dest=name, action="append", metavar="HOST" if "domains" in name else "DIR",
                                default=argparse.SUPPRESS,
                                help=help_text)
        else:
            choices = get_args(annotation) if get_origin(annotation) is Literal else None
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices,
                                metavar=None if choices else name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top (validated
    once, here)."""
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)
