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
    # structured outputs (server/api/structured_outputs.py): OpenAI's, then vLLM's extras
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = Field(None, max_length=4096)
    guided_choice: list[str] | None = Field(None, max_length=1024)
    guided_grammar: str | None = None


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


class MessageFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., max_length=128)
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls, as OpenAI returned them
    tool_call_id: str | None = None  # a tool turn: the call it answers


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, **BIG)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, **BIG)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(..., description="a prompt (text or token ids) or a list of prompts: one choice each")
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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = Field(None, description='"stop", "length", "tool_calls", or "abort" when the server stopped it')


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
    tool_calls: list[dict[str, Any]] | None = None


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


class ModelPermission(BaseModel):
    """vLLM's (and the old OpenAI API's) permission entry of a model card."""

    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moleserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = []
    kind: str | None = Field(None, description="a bank's kind (lora, mixlora, dynmole, mola); None: the base model")
    num_experts: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenization (vLLM's /tokenize and /detokenize) ------------------------------------------------


class TokenizeRequest(_Request):
    """Either ``prompt`` (text) or ``messages`` (rendered by the chat template, with ``tools``)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(..., max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# -- banks -------------------------------------------------------------------------------------


PATH = dict(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")  # a NUL byte is no path


class LoadBankRequest(_Request):
    name: str = Field(..., min_length=1, max_length=128)
    path: str = Field(..., **PATH)
    pinned: bool = Field(True, description="never evicted from host memory (false: an idle bank may be evicted "
                         "under --max-loaded-banks and is loaded again from its path on its next request)")


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
