"""Request bodies over K2_MAX_BODY_BYTES are refused with 413, before they are read whole.

A declared Content-Length over the limit is refused before a byte of the body is read; a chunked
body (no length declared) is counted as it arrives and refused at the first chunk past the limit,
so the server never holds more than the limit of any body. The 413 asks the client to close the
connection: the unread rest of the body is not worth reading.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2.api.errors import ApiError, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, "body_too_large", f"request body larger than {self.max_bytes} bytes (K2_MAX_BODY_BYTES)",
                        headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            refusal = self._too_large()
            await error_response(refusal.status, refusal.code, refusal.message, headers=refusal.headers)(
                scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # the app's error handlers answer it, as any ApiError
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app runs
    return None
