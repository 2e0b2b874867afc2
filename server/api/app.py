"""The FastAPI app: routes, auth, limits, lifecycle. ``create_app`` wires the engine, the bank
registry and the metrics together; nothing here knows how generation works.

Routes: GET /health, GET /ready, GET /metrics, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, vLLM's POST /tokenize, POST /detokenize and GET /version, and with an admin
key the bank routes of banks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from server.metrics import ServerMetrics
from server.multimodal.media import MediaPolicy
from server.settings import Settings

from . import banks as bank_routes
from .auth import AuthGate, admin_key_guard, api_key_guard
from .errors import APIError, error_body, install_error_handlers
from .lifecycle import Admission
from .protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList,
                       ModelPermission, TokenizeRequest, TokenizeResponse, VersionResponse)
from .serving_chat import OpenAIServingChat
from .serving_completions import OpenAIServingCompletion
from .serving_engine import ServingContext
from .serving_tokenization import OpenAIServingTokenization
from .tokenizer_pool import TokenizerPool

log = logging.getLogger("moleserve.api")

_STARTED = int(time.time())  # "created" of the models list
try:
    _VERSION = importlib.metadata.version("moleserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    _VERSION = "0.1.0"
ALWAYS_OPEN = ("/health", "/ready", "/metrics")  # still answered while draining
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 422, 429, 503)}
STREAM = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "with stream=true: server-sent events, ending with data: [DONE]"}
# Every route: a method it does not have is a 405 naming the allowed ones in ``Allow``.
NOT_ALLOWED = {405: {"model": ErrorResponse, "description": "method not allowed",
                     "headers": {"Allow": {"description": "the methods the route has", "schema": {"type": "string"}}}}}


def create_app(settings: Settings, engine: Any, banks: Any = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """``engine``: an ``AsyncEngine`` (or anything with its surface); ``banks``: a ``BankAdmin``
    (server/api/banks.py) or None. The lifespan starts the engine and stops it."""
    model_name = settings.served_model_name or engine.model_config.name
    max_model_len = (settings.max_model_len or getattr(engine, "max_model_len", None)
                     or engine.model_config.max_position_embeddings)
    metrics = metrics or ServerMetrics(model_name, max_lora=getattr(engine, "max_banks", 0) or 0)
    admission = Admission()
    tokenizers = TokenizerPool(engine.tokenizer, workers=settings.tokenizer_workers)
    ctx = ServingContext(engine=engine, model_name=model_name, max_model_len=max_model_len, admission=admission,
                         metrics=metrics, banks=banks, retry_after=settings.retry_after, tokenizers=tokenizers,
                         max_tokens_default=settings.max_tokens_default, max_tokens_limit=settings.max_tokens_limit,
                         max_messages=settings.max_messages, media=MediaPolicy.from_settings(settings),
                         max_prompts=settings.max_prompts, max_n=min(settings.max_n, settings.max_num_seqs),
                         tool_call_parser=settings.tool_call_parser)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.set_stats_sink(metrics)
        if not engine.is_running:
            await engine.start()
        if banks is not None:
            metrics.banks_loaded.set(len(banks.list()))
        if callable(getattr(banks, "residency_stats", None)):
            metrics.watch_residency(banks.residency_stats)
        _report_capacity(engine, metrics)
        try:
            yield
        finally:
            await engine.stop()
            tokenizers.shutdown()
            chat.images.shutdown()

    app = FastAPI(title="moleserve", version=_VERSION, lifespan=lifespan, responses=NOT_ALLOWED,
                  description="OpenAI-compatible inference with mixture-of-LoRA-experts banks.")
    app.openapi = lambda: _openapi_with_events(app)
    app.state.settings, app.state.engine, app.state.banks = settings, engine, banks
    app.state.metrics, app.state.admission, app.state.retry_after = metrics, admission, settings.retry_after
    app.state.model_name, app.state.max_model_len, app.state.tokenizers = model_name, max_model_len, tokenizers
    install_error_handlers(app)
    api_key, admin_key = Settings.secret(settings.api_key), Settings.secret(settings.admin_key)
    gate = AuthGate(api_key, admin_key, bank_routes.PATHS, ALWAYS_OPEN if not settings.metrics_auth else ALWAYS_OPEN[:2])
    app.add_middleware(LimitsMiddleware, admission=admission, max_bytes=_body_limit(settings, engine),
                       retry_after=settings.retry_after, metrics=metrics, gate=gate, body_timeout=settings.body_timeout)
    guard = Depends(api_key_guard(api_key, admin_key))
    chat, completions = OpenAIServingChat(ctx), OpenAIServingCompletion(ctx)
    tokenization = OpenAIServingTokenization(ctx, chat)

    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["probes"], responses={503: {"model": ErrorResponse}})
    async def ready() -> Any:
        """Ready: the model is loaded, the engine loop runs, and the server is not shutting down."""
        if admission.draining:
            raise APIError(503, "shutting down", headers={"Retry-After": str(settings.retry_after)})
        if not engine.is_running:
            raise APIError(503, "the engine is not running", headers={"Retry-After": str(settings.retry_after)})
        return {"status": "ready", "model": model_name}

    metrics_deps = [guard] if settings.metrics_auth else []

    @app.get("/metrics", tags=["probes"], dependencies=metrics_deps, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        load = _engine_load(engine)
        if load is not None:
            metrics.set_load(*load)
        _report_capacity(engine, metrics)
        metrics.set_residency()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(dependencies=[guard], responses={401: {"model": ErrorResponse}})

    @v1.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The base model first, then every loaded bank."""
        cards = [ModelCard(id=model_name, created=_STARTED, root=model_name, max_model_len=max_model_len)]
        for b in bank_routes.bank_infos(banks):
            if b.extra.get("state") == "failed":  # out of service until reloaded (GET /v1/banks shows why)
                continue
            cards.append(ModelCard(id=b.name, created=_STARTED, root=model_name, parent=model_name,
                                   max_model_len=max_model_len, kind=b.kind, num_experts=b.num_experts))
        for card in cards:  # vLLM's permission entry
            card.permission = [ModelPermission(id=f"modelperm-{card.id}", created=_STARTED)]
        return ModelList(data=cards)

    @v1.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: the token ids of a prompt, or of chat messages as the chat template renders them."""
        return await tokenization.tokenize(body)

    @v1.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's: the text of token ids."""
        return await tokenization.detokenize(body)

    @v1.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        """The server's version."""
        return VersionResponse(version=_VERSION)

    @v1.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, 200: STREAM})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat.create(body, request)

    @v1.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: STREAM})
    async def completions_route(body: CompletionRequest, request: Request) -> Any:
        return await completions.create(body, request)

    app.include_router(v1)
    if admin_key:
        app.include_router(bank_routes.build_router(admin_key_guard(admin_key)))
    return app


def _body_limit(settings: Settings, engine: Any) -> int:
    """``--max-request-bytes``; when it is not set and the model takes images, the default plus room
    for its images as base64 ``data:`` URLs (4/3 of ``--max-image-bytes`` each), so that an image the
    media limits accept is not refused as a too-large body first."""
    limit = settings.max_request_bytes
    if "max_request_bytes" in settings.model_fields_set:
        return limit
    try:
        spec = getattr(engine, "multimodal_spec", None)
    except Exception:  # noqa: BLE001 - an engine not built yet takes no images
        spec = None
    if spec is None:
        return limit
    return limit + spec.max_images * -(-settings.max_image_bytes * 4 // 3)


def _openapi_with_events(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the shape of each server-sent event of the two generation routes (a
    chunk: ``ChatCompletionChunk`` / ``CompletionResponse``, an error event once the stream started:
    ``ErrorResponse``, or the literal ``[DONE]``), and error responses as the JSON they are."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionChunk, CompletionResponse, ErrorResponse):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in body.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, body)
    for path, chunk in (("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionResponse")):
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok["content"]["text/event-stream"] = {"schema": {
            "description": "each event is 'data: <JSON>' (a chunk, or an error once the stream started), "
                           "the last one 'data: [DONE]'",
            "oneOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"},
                      {"type": "string", "const": "[DONE]"}]}}
    for item in schema["paths"].values():  # errors are JSON even on the plain-text vLLM adapter routes
        for op in item.values():
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {})
                if status[0] in "45" and "application/json" in content:
                    content.pop("text/plain", None)
    app.openapi_schema = schema
    return schema


def _engine_load(engine: Any) -> tuple[int, int, float] | None:
    """(running, waiting, KV usage) from an engine that exposes them (AsyncEngine does), else None."""
    try:
        total = engine.kv_blocks_total
        return engine.num_running, engine.num_waiting, (total - engine.kv_blocks_free) / total if total else 0.0
    except Exception:  # noqa: BLE001 - a scrape must not fail on a stopping engine
        return None


def _report_capacity(engine: Any, metrics: ServerMetrics) -> None:
    """What the endpoint picker reads besides load: the KV cache's shape (``vllm:cache_config_info``)
    and how many banks can be resident at once (``max_lora``), from an engine that exposes them."""
    try:
        metrics.set_max_lora(int(engine.max_banks))
        metrics.set_cache_config(engine.kv_block_size, engine.kv_blocks_total, engine.kv_cache_dtype)
        metrics.set_bank_activity(*engine.bank_activity())
    except Exception:  # noqa: BLE001 - a test double without them, a stopping engine, a queue changing under us
        pass


class LimitsMiddleware:
    """Refuses new work while draining (503) and bodies over the size limit (413), before any
    route reads them. Pure ASGI so streaming and disconnect detection pass through untouched."""

    def __init__(self, app, admission: Admission, max_bytes: int, retry_after: int, metrics: ServerMetrics,
                 gate: AuthGate | None = None, body_timeout: float | None = None):
        self.app, self.admission, self.max_bytes = app, admission, max_bytes
        self.retry_after, self.metrics = retry_after, metrics
        self.gate, self.body_timeout = gate, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.admission.draining and scope["path"] not in ALWAYS_OPEN:
            self.metrics.on_rejected("shutting_down")
            return await _send_error(send, 503, "the server is shutting down; retry on another replica",
                                     {"Retry-After": str(self.retry_after), "Connection": "close"})
        headers = dict(scope.get("headers") or [])
        refused = self.gate.refusal(scope["path"], headers) if self.gate is not None else None
        if refused is not None:  # before the body is read or parsed
            return await _send_error(send, 401, refused.message, refused.headers, code=refused.code)
        length = headers.get(b"content-length")
        too_large = f"the request body is larger than the limit of {self.max_bytes} bytes"
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if declared > self.max_bytes:
                self.metrics.on_rejected("too_large")
                return await _send_error(send, 413, too_large, {"Connection": "close"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self._guarded(scope, receive, send)
        # Read the whole (bounded) body first, then replay it; later receive() calls go to the
        # server, so disconnects still reach the routes.
        chunks, size = [], 0
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None else deadline - time.monotonic())
            except TimeoutError:  # a client trickling its body must not hold the connection
                return await _send_error(send, 408, f"the request body did not arrive within {self.body_timeout:g} "
                                         "seconds", {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                self.metrics.on_rejected("too_large")
                return await _send_error(send, 413, too_large, {"Connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self._guarded(scope, replay, send)

    async def _guarded(self, scope, receive, send):
        """The last resort for an unexpected error: a JSON 500 (details in the log), never a
        traceback and never a dropped connection."""
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                await _send_error(send, 500, "internal server error")


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None,
                      code: str | None = None) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
