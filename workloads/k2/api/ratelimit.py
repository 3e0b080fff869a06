"""Per-API-key budgets: requests over a moving window (K2_RATE_LIMIT, e.g. "100/minute"), and
requests in progress at once (K2_KEY_CONCURRENCY).

The window bounds how often a key asks; the concurrency cap bounds how much it holds at a time:
a key's long exports and heavy queries cannot take every worker thread and DuckDB slot, so other
keys are still served while one floods. Counts live in process memory: each API replica enforces
the budgets on its own. Both are used from the event loop only, so plain counts are safe.

The window is kept here, a deque of a key's request times, rather than in the `limits` library's
memory storage (which still parses the spec): that storage started a timer thread whenever its
previous one had ended, under steady load one every 10 ms, at about a millisecond of the request
path each (`tests/unit/test_rate_limiter.py`).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable

from limits import parse

from k2.api.errors import ApiError


class RateLimiter:
    """At most the spec's count of requests per key in any window of its length."""

    def __init__(self, spec: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        item = parse(spec)  # a malformed spec fails at startup, not on the first request
        self._amount, self._window = item.amount, float(item.get_expiry())
        self._clock = clock
        self._times: defaultdict[str, deque[float]] = defaultdict(deque)  # a key's counted requests, oldest first

    def hit(self, key_id: str) -> None:
        """Count one request; raise a 429 carrying Retry-After once the budget is spent."""
        now, times = self._clock(), self._times[key_id]
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(times) < self._amount:
            times.append(now)
            return
        retry_after = max(1, math.ceil(times[0] + self._window - now))
        raise ApiError(429, "rate_limited", f"rate limit of {self.spec} per API key exceeded",
                       headers={"Retry-After": str(retry_after)})


class ConcurrencyLimiter:
    """Requests in progress per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_progress: Counter[str] = Counter()

    def acquire(self, key_id: str) -> None:
        """Take one of the key's slots, to `release` once its response is sent; raise a 429 when
        all are taken (refused, not queued: a queue would hold the flooding key's connections open
        instead)."""
        if self._in_progress[key_id] >= self.limit:
            raise ApiError(429, "too_many_concurrent_requests",
                           f"more than {self.limit} requests in progress for this API key (K2_KEY_CONCURRENCY)",
                           headers={"Retry-After": "1"})
        self._in_progress[key_id] += 1

    def release(self, key_id: str) -> None:
        self._in_progress[key_id] -= 1
        if not self._in_progress[key_id]:
            del self._in_progress[key_id]
