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

from k2.api.watched import WatchedFile
from k2.settings import DEV_API_KEY, Settings


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
        self._mode = settings.mode
        self._file: WatchedFile[list[str]] | None = None
        if settings.api_keys_file is not None:
            try:
                self._file = WatchedFile(settings.api_keys_file, _parse, "api keys")
            except OSError as exc:
                raise ApiKeyConfigError(f"K2_API_KEYS_FILE {settings.api_keys_file} is not readable: {exc}") from exc
        scoped = settings.api_entitlements is not None or settings.api_entitlements_file is not None
        if not self._configured() and self._mode == "prod" and not scoped:
            raise ApiKeyConfigError("K2_MODE=prod needs API keys: set K2_API_KEYS, K2_API_KEYS_FILE or scoped keys "
                                    "(K2_API_ENTITLEMENTS_FILE)")
        self._digests = self._compute_digests()

    def _configured(self) -> list[str]:
        return self._inline + (self._file.value if self._file else [])

    def _compute_digests(self) -> list[bytes]:
        keys = self._configured() or ([DEV_API_KEY] if self._mode == "dev" else [])
        return [hashlib.sha256(k.encode()).digest() for k in keys]

    def _refresh(self) -> None:
        if self._file is not None and self._file.refresh():
            self._digests = self._compute_digests()

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
