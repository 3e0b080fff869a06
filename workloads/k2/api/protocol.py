"""The HTTP protocol `k2 api` serves with: uvicorn's httptools protocol plus two deadlines uvicorn lacks.

Uvicorn times out only idle keep-alive connections, and any byte received re-arms that. So a client
that trickles its headers or body (slowloris), or that stops reading a large response, would hold
its connection, and whatever the response holds, forever. Here:
- a request's headers and body must arrive within K2_REQUEST_TIMEOUT_SECONDS of its first byte
  (of the connection, for the first request): else a 408 in the API's error shape, and the
  connection is closed;
- a response the client takes no bytes of for K2_WRITE_TIMEOUT_SECONDS (the server's send buffer
  stays full) aborts the connection: the streaming response stops and frees what it held.
Both are per connection and cost one timer each; the worker's event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from k2.api.errors import error_response
from k2.observability import HTTP_CONNECTIONS_CUT
from k2.settings import Settings

log = structlog.get_logger("k2.api")


@functools.cache
def _settings() -> Settings:
    # Read from the environment as `create_app()` does: uvicorn builds both in each worker process.
    return Settings()


@functools.cache
def _timeout_response() -> bytes:
    response = error_response(408, "request_timeout", "the request's headers and body did not arrive within "
                              f"{_settings().request_timeout_seconds:g} s (K2_REQUEST_TIMEOUT_SECONDS)")
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(response.body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + bytes(response.body)


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_request_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._request_deadline is None:  # a keep-alive connection's next request
            self._arm_request_deadline()

    def on_message_complete(self) -> None:
        # Also before a WebSocket upgrade, whose protocol then owns the transport (and pings it).
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(_settings().write_timeout_seconds, self._write_stalled)

    def resume_writing(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().resume_writing()

    def _arm_request_deadline(self) -> None:
        self._request_deadline = self.loop.call_later(_settings().request_timeout_seconds, self._request_timed_out)

    def _cancel_deadlines(self) -> None:
        for handle in (self._request_deadline, self._write_deadline):
            if handle is not None:
                handle.cancel()
        self._request_deadline = self._write_deadline = None

    def _request_timed_out(self) -> None:
        self._request_deadline = None
        if self.transport.is_closing():
            return
        HTTP_CONNECTIONS_CUT.labels("request_timeout").inc()
        log.warning("http.request_timeout", client=_peer(self.client))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # answered before the body came in: nothing more can be said
                self.transport.abort()
                return
            # The app is waiting for the body: it sees a disconnect, and its answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(_timeout_response())
        self.transport.close()

    def _write_stalled(self) -> None:
        self._write_deadline = None
        HTTP_CONNECTIONS_CUT.labels("write_timeout").inc()
        log.warning("http.write_timeout", client=_peer(self.client))
        self.transport.abort()  # close() would wait for the client to take the buffered bytes


def _peer(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
