"""Bank administration over HTTP, against the ``BankAdmin`` interface the bank registry implements.

Routes (only when an admin key is set; otherwise they do not exist):
    GET    /v1/banks                    the loaded banks
    POST   /v1/banks {name, path}       load, or replace a loaded bank of that name
    DELETE /v1/banks/{name}             unload
    POST   /v1/load_lora_adapter   {lora_name, lora_path}   vLLM's names, so its tooling works
    POST   /v1/unload_lora_adapter {lora_name}
Path checks against the allowed roots happen inside the registry (``adapters.paths``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from .errors import APIError, from_exception
from .protocol import BankCard, BankList, ErrorResponse, LoadBankRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


@dataclass(frozen=True)
class BankInfo:
    """What the registry tells about one loaded bank. A registry may return its own object with at
    least these attributes; ``extra`` (or any further dataclass fields) is shown as well."""

    name: str
    kind: str  # lora, mixlora, dynmole, mola
    num_experts: int
    version: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BankAdmin(Protocol):
    """Implemented by the bank registry. Errors carry ``.status`` (400 bad bank or path outside the
    allowed roots, 404 no such bank / path, 409 conflict such as a bank in use) and a message."""

    def list(self) -> list[BankInfo]: ...

    async def load(self, name: str, path: str) -> BankInfo: ...

    async def unload(self, name: str) -> None: ...


def bank_info(info: Any) -> BankInfo:
    """A registry's description of a bank (a ``BankInfo``, a dict or an object with the same
    attributes) as a ``BankInfo``; further keys go to ``extra``."""
    if isinstance(info, BankInfo):
        return info
    if isinstance(info, dict):
        data = dict(info)
    elif is_dataclass(info):
        data = asdict(info)
    else:
        data = dict(vars(info))
    extra = {**(data.pop("extra", None) or {}), **{k: v for k, v in data.items() if k not in _CORE}}
    return BankInfo(name=data["name"], kind=data.get("kind", "unknown"), num_experts=int(data.get("num_experts") or 0),
                    version=data.get("version"), extra=extra)


def bank_infos(banks: BankAdmin | None) -> list[BankInfo]:
    return [bank_info(b) for b in banks.list()] if banks is not None else []


def bank_card(info: Any) -> BankCard:
    b = bank_info(info)
    extra = {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in b.extra.items()}
    return BankCard(**extra, name=b.name, kind=b.kind, num_experts=b.num_experts, version=b.version)


_CORE = ("name", "kind", "num_experts", "version")
PATHS = ("/v1/banks", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # the admin key's routes


def build_router(admin_guard) -> APIRouter:
    json_error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    router = APIRouter(dependencies=[Depends(admin_guard)], tags=["banks"],
                       responses={401: {"model": ErrorResponse, **json_error}, 404: {"model": ErrorResponse, **json_error}})

    def registry(request: Request) -> BankAdmin:
        if request.app.state.banks is None:
            raise APIError(503, "bank administration is not available: this server has no bank registry")
        return request.app.state.banks

    async def timed(request: Request, action: str, op):
        metrics = request.app.state.metrics
        start = time.perf_counter()
        try:
            result = await op()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error body
            metrics.on_bank_operation(action, time.perf_counter() - start, ok=False)
            raise from_exception(exc) from None
        metrics.on_bank_operation(action, time.perf_counter() - start, ok=True,
                                  banks_loaded=len(registry(request).list()))
        return result

    @router.get("/v1/banks", response_model=BankList)
    async def list_banks(request: Request) -> BankList:
        return BankList(data=[bank_card(b) for b in bank_infos(registry(request))])

    @router.post("/v1/banks", response_model=BankCard,
                 responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def load_bank(body: LoadBankRequest, request: Request) -> BankCard:
        info = await timed(request, "load", lambda: registry(request).load(body.name, body.path))
        return bank_card(info)

    @router.delete("/v1/banks/{name}", responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def unload_bank(name: str, request: Request) -> dict[str, Any]:
        await timed(request, "unload", lambda: registry(request).unload(name))
        return {"name": name, "object": "bank", "deleted": True}

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
                 responses={400: {"model": ErrorResponse, **json_error}, 409: {"model": ErrorResponse, **json_error}})
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
        await timed(request, "load", lambda: registry(request).load(body.lora_name, body.lora_path))
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
                 responses={400: {"model": ErrorResponse, **json_error}, 409: {"model": ErrorResponse, **json_error}})
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
        await timed(request, "unload", lambda: registry(request).unload(body.lora_name))
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    return router
