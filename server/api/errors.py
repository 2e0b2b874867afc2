"""OpenAI-style error bodies, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

A client's mistake is a 4xx with a readable message; anything unexpected is a 500 with a generic
message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.protocol import EngineError

log = logging.getLogger("moleserve.api")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.param, self.code, self.headers = param, code, headers


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type, param, code), status_code=status, headers=headers)


def from_exception(exc: BaseException, retry_after: int = 1) -> APIError:
    """Any error a route may see, as an ``APIError``: engine errors and bank errors carry a
    ``.status``; anything else is a 500 whose details stay in the log."""
    if isinstance(exc, APIError):
        return exc
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
        etype = getattr(exc, "type", None)
        etype = etype if isinstance(etype, str) else None
        code = getattr(exc, "code", None)
        return APIError(status, str(exc) or TYPES.get(status, "error"), type=etype, code=code,
                        param=getattr(exc, "param", None), headers=headers)
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, int]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None, 400
    for e in errors:
        if e.get("type") == "unicode_surrogate":  # a value no text can hold: a bad value, as OpenAI says 400
            param = (e.get("ctx") or {}).get("param", "body")
            return f"{param}: {e.get('msg')}", param, 400
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param, 422


def install_error_handlers(app: FastAPI) -> None:
    retry_after = lambda: getattr(app.state, "retry_after", 1)  # noqa: E731

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        e = from_exception(exc, retry_after())
        return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, status = _validation_message(exc)
        return error_response(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else TYPES.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
