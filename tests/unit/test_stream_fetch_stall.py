"""The stream's fetch-stall watch: a writer behind the log end that fetches nothing is sought
again from its table's offsets, once per quiet period; a writer that is caught up, or that
fetched recently, is left alone."""

from __future__ import annotations

import time

import pytest

from k2.stream.runner import FetchStallWatch

pytestmark = pytest.mark.unit


class Writer:
    """What the watch reads of a TableWriter, with the lag a test sets."""

    table_name = "trades"

    def __init__(self, *, behind: int, quiet_for: float) -> None:
        self.behind = behind
        self.last_message_at = time.monotonic() - quiet_for
        self.assigned = {0, 1}
        self.flushes = 0
        self.reseeks = 0

    def flush(self) -> None:
        self.flushes += 1

    def lag(self) -> int:
        return self.behind

    def reseek(self) -> None:
        self.reseeks += 1


def test_a_quiet_writer_behind_the_log_end_is_sought_again_once_per_quiet_period():
    stalled = Writer(behind=500, quiet_for=30)
    watch = FetchStallWatch(stall_seconds=20)
    watch.check([stalled])
    watch.check([stalled])  # right after: no second seek until another quiet period has passed
    assert (stalled.flushes, stalled.reseeks) == (1, 1)
    watch.last_action[id(stalled)] -= 21
    watch.check([stalled])
    assert stalled.reseeks == 2


def test_a_caught_up_or_recently_fed_or_unassigned_writer_is_left_alone():
    caught_up = Writer(behind=0, quiet_for=30)
    fed = Writer(behind=500, quiet_for=1)
    unassigned = Writer(behind=500, quiet_for=30)
    unassigned.assigned = set()
    FetchStallWatch(stall_seconds=20).check([caught_up, fed, unassigned])
    assert [w.reseeks for w in (caught_up, fed, unassigned)] == [0, 0, 0]
    assert fed.flushes == 0 and unassigned.flushes == 0
