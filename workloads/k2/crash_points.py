"""Test-only: a process that kills itself (SIGKILL) at a named step of its work.

The kill -9 tests must stop `k2 stream run` exactly between two steps of one commit, and
`k2 ingest` with part of its messages delivered and part still in flight, which no signal sent
from outside can time (a run can end before a watcher sees its first message). With
`K2_TEST_CRASH_AT=<point>` (or `<point>@<n>`: the n-th arrival there, default the first; a stream
counts per table writer) the process sends itself SIGKILL when it reaches that point:

- `before_files` (stream): the batch is decoded and its dead letters acknowledged; no data file
  written yet;
- `after_files` (stream): the batch's data files (and manifests) are written; the catalog commit is
  not made;
- `after_commit` (stream): the catalog commit is made; the consumer-group offsets are not;
- `ingest_checkpoint` (ingest): another checkpoint's worth of a file's lines (20,000) was handed to
  the producer, which has not necessarily delivered it.

Never in production: the variable is not a setting, and with `K2_MODE=prod` (what the operator
renders) it is ignored with a warning.
"""

from __future__ import annotations

import os
import signal

import structlog

from k2.settings import Settings

log = structlog.get_logger("k2.crash_points")
ENV = "K2_TEST_CRASH_AT"
POINTS = ("before_files", "after_files", "after_commit", "ingest_checkpoint")


class CrashPoints:
    def __init__(self, settings: Settings) -> None:
        self.point: str | None = None
        self.remaining = 0
        value = os.environ.get(ENV, "")
        if not value:
            return
        if settings.mode == "prod":
            log.warning("test_crash_ignored", variable=ENV, value=value, reason="K2_MODE=prod")
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
            log.warning("test_crash", point=point)
            os.kill(os.getpid(), signal.SIGKILL)
