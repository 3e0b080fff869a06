"""A mounted Secret file, parsed again whenever the kubelet swaps it (rotation without a restart)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("k2.api")
T = TypeVar("T")


class WatchedFile(Generic[T]):
    """`parse(text)` of the file, re-read when its mtime changes. The first read raises; later
    failures (a Secret mid-swap, a bad edit) are logged and the last good value is kept."""

    def __init__(self, path: Path, parse: Callable[[str], T], what: str) -> None:
        self.path, self._parse, self.what = Path(path), parse, what
        self._lock = threading.Lock()
        self._mtime = os.stat(self.path).st_mtime_ns
        self.value = parse(self.path.read_text())

    def refresh(self) -> bool:
        """True when the value changed."""
        with self._lock:
            try:
                mtime = os.stat(self.path).st_mtime_ns
                if mtime == self._mtime:
                    return False
                self.value, self._mtime = self._parse(self.path.read_text()), mtime
            except Exception as exc:  # noqa: BLE001 - whatever the new content is, the old one still serves
                log.warning("api.secret_file_unreadable", what=self.what, path=str(self.path), error=str(exc))
                return False
        log.info("api.secret_file_reloaded", what=self.what, path=str(self.path))
        return True
