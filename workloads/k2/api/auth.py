"""API keys: `X-API-Key` on every /v1 route.

Keys come from K2_API_KEYS (comma-separated) and K2_API_KEYS_FILE (a mounted Secret: keys
separated by commas or newlines, `#` starts a comment). The file is re-read when it changes, so
a rotated Secret takes effect without a restart. The built-in dev key is accepted only in dev
mode with no key configured; prod mode without keys refuses to start.

Presented keys are compared in constant time against every configured key (as SHA-256 digests,
so not even a key's length leaks), and never logged: requests are attributed to a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

import structlog

from k2.settings import DEV_API_KEY, Settings

log = structlog.get_logger("k2.api.auth")


class ApiKeyConfigError(RuntimeError):
    """The configured keys are unusable: the API must not start."""


def key_id(key: str) -> str:
    """How a key appears in logs and rate-limit buckets."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _parse(text: str) -> list[str]:
    keys: list[str] = []
    for line in text.splitlines():
        keys.extend(k.strip() for k in line.split("#", 1)[0].split(","))
    return [k for k in keys if k]


class ApiKeys:
    def __init__(self, settings: Settings) -> None:
        self._inline = _parse(settings.api_keys)
        self._file = settings.api_keys_file
        self._mode = settings.mode
        self._lock = threading.Lock()
        self._file_mtime: int | None = None
        self._file_keys: list[str] = []
        if self._file is not None:
            try:
                self._read_file(self._file)
            except OSError as exc:
                raise ApiKeyConfigError(f"K2_API_KEYS_FILE {self._file} is not readable: {exc}") from exc
        scoped = settings.api_entitlements is not None or settings.api_entitlements_file is not None
        if not self._configured() and self._mode == "prod" and not scoped:
            raise ApiKeyConfigError("K2_MODE=prod needs API keys: set K2_API_KEYS, K2_API_KEYS_FILE or scoped keys "
                                    "(K2_API_ENTITLEMENTS_FILE)")
        self._digests = self._compute_digests()

    def _read_file(self, file: Path) -> None:
        path = Path(file)
        mtime = os.stat(path).st_mtime_ns
        if mtime != self._file_mtime:
            self._file_keys = _parse(path.read_text())
            self._file_mtime = mtime

    def _configured(self) -> list[str]:
        return self._inline + self._file_keys

    def _compute_digests(self) -> list[bytes]:
        keys = self._configured() or ([DEV_API_KEY] if self._mode == "dev" else [])
        return [hashlib.sha256(k.encode()).digest() for k in keys]

    def _refresh(self) -> None:
        if self._file is None:
            return
        with self._lock:
            previous = self._file_mtime
            try:
                self._read_file(self._file)
            except OSError as exc:  # a Secret being swapped: keep the keys we had
                log.warning("api.keys_file_unreadable", path=str(self._file), error=str(exc))
                return
            if self._file_mtime != previous:
                self._digests = self._compute_digests()
                log.info("api.keys_reloaded", path=str(self._file), keys=len(self._digests))

    def identify(self, presented: str | None) -> str | None:
        """The key's id when `presented` is a valid key, else None."""
        if not presented:
            return None
        self._refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        matched = False
        for candidate in self._digests:  # no early exit: timing does not tell which key matched
            matched |= hmac.compare_digest(digest, candidate)
        return key_id(presented) if matched else None
