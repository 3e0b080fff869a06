"""Who may call `/v1`, and how much: the API key, the key's entitlements, its rate limit and its
requests in progress, checked once per request before routing.

Plain ASGI middleware rather than FastAPI dependencies: solving the key, rate-limit and slot
dependencies cost about 0.3 ms of CPU per request, a quarter of a point query's whole time
(`docs/benchmarks.md`, "2026-12-04 midday"). The order is the dependencies' was: a request without
a valid key is a 401, never a 429. The slot is held until the response, a streamed export
included, has been sent or the client is gone. WebSockets identify their key in the route (header
or first message), through `caller`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from k2.api.auth import ApiKeys
from k2.api.errors import ApiError, error_response
from k2.api.middleware import ROUTE_TEMPLATE
from k2.api.ratelimit import ConcurrencyLimiter, RateLimiter
from k2.query import scope as scopes
from k2.query.scope import Scope as KeyScope

KEY_HEADER = "X-API-Key"
_SCHEME = {"APIKeyHeader": {"type": "apiKey", "in": "header", "name": KEY_HEADER,
                            "description": "K2_API_KEYS_FILE / K2_API_KEYS (digests); dev mode without keys "
                                           "accepts the built-in development key"}}
_KEY_HEADER_BYTES = KEY_HEADER.lower().encode()
_GUARDED = "/v1/"


def caller(api_keys: ApiKeys, presented: str | None) -> tuple[str, KeyScope | None]:
    """The key's id and scope (None: unrestricted); a 401 without a valid key."""
    found = api_keys.identify(presented)
    if found is None:
        raise ApiError(401, "unauthorized", f"missing or invalid {KEY_HEADER} header",
                       headers={"WWW-Authenticate": "ApiKey"})
    return found


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, api_keys: ApiKeys, rate_limiter: RateLimiter, concurrency: ConcurrencyLimiter,
                 openapi: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.api_keys = api_keys
        self.rate_limiter, self.concurrency = rate_limiter, concurrency
        self._openapi = openapi
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_GUARDED):
            await self.app(scope, receive, send)
            return
        try:
            identity, key_scope = caller(self.api_keys, _presented(scope))
            structlog.contextvars.bind_contextvars(api_key_id=identity)
            self.rate_limiter.hit(identity)
            self.concurrency.acquire(identity)
        except ApiError as refusal:
            self._label(scope)
            await error_response(refusal.status, refusal.code, refusal.message, headers=refusal.headers)(
                scope, receive, send)
            return
        try:
            scopes.bind(key_scope)  # every query of this request reads only what the key is entitled to
            await self.app(scope, receive, send)
        finally:
            self.concurrency.release(identity)

    def _label(self, scope: Scope) -> None:
        """Name the route template a refused request asked for: metrics and the access log count
        refusals per route, not as unmatched. From the OpenAPI paths, which every /v1 route is in
        (routing's own matching is FastAPI-internal); worked out on the first refusal."""
        if self._templates is None:
            self._templates = [(compile_path(path)[0], path) for path in self._openapi()["paths"]
                               if path.startswith(_GUARDED)]
        for pattern, template in self._templates:
            if pattern.match(scope["path"]):
                scope[ROUTE_TEMPLATE] = template
                return


def _presented(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _KEY_HEADER_BYTES:
            return value.decode("latin-1")
    return None


def document_key(app: FastAPI) -> None:
    """Declare the key on every /v1 operation of the app's OpenAPI schema, as a FastAPI security
    dependency would have (clients and the docs' "Authorize" read it there)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI keeps it as app.openapi_schema: completed here once
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(_SCHEME)
            for path, operations in schema["paths"].items():
                if path.startswith(_GUARDED):
                    for operation in operations.values():
                        operation["security"] = [{name: []} for name in _SCHEME]
            return schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
