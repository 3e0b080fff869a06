"""Test-only: a writer that kills itself (SIGKILL) at a named step of a commit.

The kill -9 tests (in `tests/integration/test_stream_iceberg.py`) must stop `k2 stream run` exactly
between two steps of one commit, which no signal sent from outside can time. With
`K2_TEST_CRASH_AT=<point>` (or `<point>@<n>`: a table writer's n-th arrival there, default the
first) the process sends itself SIGKILL when it reaches that point:

- `before_files`: the batch is decoded and its dead letters acknowledged; no data file written yet;
- `after_files`: the batch's data files (and manifests) are written; the catalog commit is not made;
- `after_commit`: the catalog commit is made; the consumer-group offsets are not.

Never in production: the variable is not a setting, and with `K2_MODE=prod` (what the operator
renders) it is ignored with a warning.
"""

from __future__ import annotations

import os
import signal

import structlog

from k2.settings import Settings

log = structlog.get_logger("k2.stream")
ENV = "K2_TEST_CRASH_AT"
POINTS = ("before_files", "after_files", "after_commit")


class CrashPoints:
    def __init__(self, settings: Settings) -> None:
        self.point: str | None = None
        self.remaining = 0
        value = os.environ.get(ENV, "")
        if not value:
            return
        if settings.mode == "prod":
            log.warning("stream.test_crash_ignored", variable=ENV, value=value, reason="K2_MODE=prod")
            return
        point, at, nth = value.partition("@")
        if point not in POINTS or (at and not (nth.isdigit() and int(nth) > 0)):
            raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(POINTS)}, optionally followed by @<n>")
        self.point, self.remaining = point, int(nth) if at else 1

    def reach(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            log.warning("stream.test_crash", point=point)
            os.kill(os.getpid(), signal.SIGKILL)
