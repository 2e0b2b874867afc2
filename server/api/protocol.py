"""Pydantic models of the HTTP API's request and response bodies (OpenAI's, with vLLM's extras).

Types and shapes are checked here (a wrong type is a 422); value ranges are checked once, by
``SamplingParams.validate`` and the serving code (a bad value is a 400), as OpenAI does.
Unknown fields are ignored, so newer clients that send more keep working.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

INT64 = dict(ge=-(2**63), le=2**64 - 1)
BIG = dict(ge=-(2**31), le=2**31 - 1)  # counts and lengths: anything beyond is a 400 anyway


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        """JSON may escape a lone UTF-16 surrogate ("\\ud800"); it is no character, no tokenizer
        or response can encode it: refused here (400, ``param`` naming the field) for every field."""
        where = _surrogate_at(data, ())
        if where is not None:
            raise PydanticCustomError("unicode_surrogate", "a lone UTF-16 surrogate (\\ud800-\\udfff) is not "
                                      "valid Unicode text", {"param": ".".join(map(str, where)) or "body"})
        return data


def _surrogate_at(value: Any, path: tuple) -> tuple | None:
    """The path of the first string (value or key) in ``value`` holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _surrogate_at(k, path + (k,)) if isinstance(k, str) else None
            hit = hit or _surrogate_at(v, path + (k,))
            if hit is not None:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hit = _surrogate_at(v, path + (i,))
            if hit is not None:
                return hit
    return None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and completions."""

    model: str | None = Field(None, description="the base model's name or a loaded bank's name (default: the base model)")
    max_tokens: int | None = Field(None, **BIG)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = Field(None, max_length=16)
    n: int | None = Field(1, **BIG)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, **BIG)
    min_p: float | None = None
    min_tokens: int = Field(0, **BIG)
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool = False


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(..., description="data:image/...;base64,..., or http(s):// (--allowed-media-domains), or "
                                      "file:// (--allowed-local-media-path)")
    detail: str | None = None


class ContentPart(BaseModel):
    """A message content part: ``{"type": "text", "text"}`` or ``{"type": "image_url", "image_url": {"url"}}``
    (other types are a 400 naming the part)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


TextPart = ContentPart  # the name before image parts


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, **BIG)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, **BIG)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(..., description="one prompt: text or token ids")
    logprobs: int | None = Field(None, **BIG)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, **BIG)


# -- responses ---------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = Field(None, description='"stop", "length", or "abort" when the server stopped it')


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moleserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    kind: str | None = Field(None, description="a bank's kind (lora, mixlora, dynmole, mola); None: the base model")
    num_experts: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- banks -------------------------------------------------------------------------------------


PATH = dict(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")  # a NUL byte is no path


class LoadBankRequest(_Request):
    name: str = Field(..., min_length=1, max_length=128)
    path: str = Field(..., **PATH)


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_path: str = Field(..., **PATH)


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_int_id: int | None = None


class BankCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str
    num_experts: int
    version: int | str | None = None


class BankList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BankCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
