"""Graceful stop for the long loops (`k2 ingest`, `k2 stream run`): SIGTERM/SIGINT set a flag the
loop looks at between units of work, so it can flush and commit what it has before returning."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger("k2")


class StopFlag:
    """While entered, SIGTERM/SIGINT set `stop` (logged as `event`) instead of ending the process."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.stop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller owns signals
                pass
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.warning(self.event, signal=signal.Signals(signum).name)
        self.stop = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
