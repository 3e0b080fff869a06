"""Per-API-key request budget (K2_RATE_LIMIT, e.g. "100/minute"), over a moving window.

Counts live in process memory: each API replica enforces the budget on its own.
"""

from __future__ import annotations

import math
import time

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
