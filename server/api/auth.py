"""Bearer-token checks: the API key on the OpenAI routes, the admin key on the bank routes.

Tokens are compared in constant time (``hmac.compare_digest`` on bytes). A route guarded by the API
key also accepts the admin key: an operator holding the admin key can use the API too.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str | None, keys: list[str]) -> bool:
    if token is None:
        return False
    got = token.encode()
    ok = False
    for key in keys:  # every key is compared, so timing says nothing about which one matched
        ok |= hmac.compare_digest(got, key.encode())
    return ok


def _refuse(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def api_key_guard(api_key: str | None, admin_key: str | None):
    """A FastAPI dependency: a no-op without an API key."""
    keys = [k for k in (api_key, admin_key) if k]

    async def check(request: Request) -> None:
        if api_key and not _matches(_bearer(request), keys):
            raise _refuse("missing or invalid API key (send 'Authorization: Bearer <key>')")

    return check


def admin_key_guard(admin_key: str):
    async def check(request: Request) -> None:
        if not _matches(_bearer(request), [admin_key]):
            raise _refuse("missing or invalid admin key (send 'Authorization: Bearer <admin key>')")

    return check


class AuthGate:
    """The same checks by path, for the limits middleware to run before a body is read: a guarded
    route answers 401 without parsing a byte of it (no probing admin routes with malformed bodies,
    no megabyte parsed for a client without a key). The route dependencies above still run."""

    def __init__(self, api_key: str | None, admin_key: str | None, admin_paths: tuple[str, ...], open_paths: tuple[str, ...]):
        self.api_keys = [k for k in (api_key, admin_key) if k]
        self.api_key, self.admin_key = api_key, admin_key
        self.admin_paths, self.open_paths = admin_paths, open_paths

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if path in self.open_paths or not path.startswith("/v1/"):
            return None
        raw = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = raw.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if self.admin_key and any(path == p or path.startswith(p + "/") for p in self.admin_paths):
            if not _matches(token, [self.admin_key]):
                return _refuse("missing or invalid admin key (send 'Authorization: Bearer <admin key>')")
            return None
        if self.api_key and not _matches(token, self.api_keys):
            return _refuse("missing or invalid API key (send 'Authorization: Bearer <key>')")
        return None
