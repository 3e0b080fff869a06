"""Per-request observability, as plain ASGI middleware (no extra task per request, so context
variables set here are the ones every log line of the request sees).

Inside `CorrelationIdMiddleware`: binds the correlation id into structlog's context, records
`k2_http_requests_total` and `k2_http_request_duration_seconds` under the route *template* (so
label cardinality stays bounded), writes one access-log line, and turns an unhandled exception
into the standard 500 body, which the correlation middleware outside still stamps with its header.
"""

from __future__ import annotations

import time

import structlog
from asgi_correlation_id import correlation_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2.api.errors import error_response
from k2.observability import HTTP_DURATION, HTTP_REQUESTS

log = structlog.get_logger("k2.api")
# Probes and scrapes arrive every few seconds; their access lines are debug, not info.
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
# The route template of a request refused before routing (`k2.api.access`), in its ASGI scope.
ROUTE_TEMPLATE = "k2.route_template"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_status(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id.get())
        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            log.exception("http.unhandled_error", path=scope["path"])
            if response_started:
                raise  # mid-stream: the client sees a truncated body; nothing else can be sent
            await error_response(500, "internal_error", "internal error; quote the correlation id when "
                                 "reporting it")(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = (scope.get(ROUTE_TEMPLATE) or getattr(route, "path_format", None) or getattr(route, "path", None)
                        or "unmatched")
            elapsed = time.perf_counter() - started
            HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
            HTTP_DURATION.labels(scope["method"], template).observe(elapsed)
            emit = log.debug if template in _QUIET_ROUTES and status < 500 else log.info
            emit("http.request", method=scope["method"], route=template, status=status, ms=round(elapsed * 1000, 2))
            structlog.contextvars.clear_contextvars()
