"""How long to wait before trying again: exponential from the configured base, with jitter, so
many resources waiting on one outage do not retry in lockstep."""

from __future__ import annotations

import random

from k2_operator.handlers import runtime

MAX_DELAY = 300.0


def retry_delay(attempt: int) -> float:
    """base × 2^attempt, capped at five minutes, then a random point in its upper half."""
    ceiling = min(runtime.get().config.retry_delay * (2 ** min(max(attempt, 0), 16)), MAX_DELAY)
    return random.uniform(ceiling / 2, ceiling)
