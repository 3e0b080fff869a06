"""The per-key moving window (`k2.api.ratelimit.RateLimiter`): exact counts, Retry-After, and no
work off the request path."""

from __future__ import annotations

import threading

import pytest

from k2.api.errors import ApiError
from k2.api.ratelimit import RateLimiter

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_budget_per_moving_window_and_is_told_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter("3/minute", clock=clock)
    for at in (1000.0, 1010.0, 1020.0):
        clock.now = at
        limiter.hit("a")
    clock.now = 1030.0
    with pytest.raises(ApiError) as refused:
        limiter.hit("a")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers["Retry-After"] == "30"  # the first request leaves the window at 1060
    limiter.hit("b")  # budgets are per key
    clock.now = 1059.5
    with pytest.raises(ApiError):
        limiter.hit("a")  # a refused request does not count, but the window has not moved yet
    clock.now = 1060.0
    limiter.hit("a")  # the request of 1000 has left the window
    with pytest.raises(ApiError) as refused:
        limiter.hit("a")
    assert refused.value.headers["Retry-After"] == "10"


def test_counting_requests_starts_no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `limits` library's memory storage started a timer thread whenever its last one had
    ended: under steady load one every 10 ms, each about a millisecond of the request path."""
    started = []
    original = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread), original(thread))[1])
    limiter = RateLimiter("1000000/minute")
    for _ in range(20):
        limiter.hit("a")
        threading.Event().wait(0.002)
    assert started == []
