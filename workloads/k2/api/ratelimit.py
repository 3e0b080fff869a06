"""Per-API-key budgets: requests over a moving window (K2_RATE_LIMIT, e.g. "100/minute"), and
requests in progress at once (K2_KEY_CONCURRENCY).

The window bounds how often a key asks; the concurrency cap bounds how much it holds at a time:
a key's long exports and heavy queries cannot take every worker thread and DuckDB slot, so other
keys are still served while one floods. Counts live in process memory: each API replica enforces
the budgets on its own.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from k2.api.errors import ApiError


class RateLimiter:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._item = parse(spec)  # a malformed spec fails at startup, not on the first request
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, key_id: str) -> None:
        """Count one request; raise a 429 carrying Retry-After once the budget is spent."""
        if self._limiter.hit(self._item, key_id):
            return
        reset_at = self._limiter.get_window_stats(self._item, key_id).reset_time
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ApiError(429, "rate_limited", f"rate limit of {self.spec} per API key exceeded",
                       headers={"Retry-After": str(retry_after)})


class ConcurrencyLimiter:
    """Requests in progress per key. Used from the event loop only, so plain counts are safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_progress: Counter[str] = Counter()

    @contextmanager
    def slot(self, key_id: str) -> Iterator[None]:
        """Hold one of the key's slots; raise a 429 when all are taken (refused, not queued: a
        queue would hold the flooding key's connections open instead)."""
        if self._in_progress[key_id] >= self.limit:
            raise ApiError(429, "too_many_concurrent_requests",
                           f"more than {self.limit} requests in progress for this API key (K2_KEY_CONCURRENCY)",
                           headers={"Retry-After": "1"})
        self._in_progress[key_id] += 1
        try:
            yield
        finally:
            self._in_progress[key_id] -= 1
            if not self._in_progress[key_id]:
                del self._in_progress[key_id]
