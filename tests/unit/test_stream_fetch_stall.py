"""The stream's fetch-stall watch: a writer behind the log end that fetches nothing is sought
again from its table's offsets, once per quiet period, and given a new consumer when that did not
help; a writer that its group left without partitions while nobody writes its table gets a new
consumer too. A writer that is caught up, fed recently or just assigned is left alone."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from k2.stream.runner import FetchStallWatch
from k2.stream.writer import TableWriter

pytestmark = pytest.mark.unit


class Writer:
    """What the watch reads of a TableWriter, with the lag a test sets."""

    table_name = "trades"

    def __init__(self, *, behind: int, quiet_for: float, assigned_for: float = 600,
                 table_quiet_for: float = 600) -> None:
        self.behind = behind
        self.last_message_at = time.monotonic() - quiet_for
        self.assignment_changed_at = time.monotonic() - assigned_for
        self.table_quiet_for = table_quiet_for
        self.assigned = {0, 1}
        self.remedies: list[str] = []
        self.flushes = 0
        self.asked_left_behind = 0

    def flush(self) -> None:
        self.flushes += 1

    def lag(self) -> int:
        return self.behind

    def left_behind(self, quiet_seconds: float) -> bool:
        self.asked_left_behind += 1
        return self.behind > 0 and self.table_quiet_for >= quiet_seconds

    def reseek(self) -> None:
        self.remedies.append("reseek")

    def rejoin(self) -> None:
        self.remedies.append("rejoin")


def _a_quiet_period_later(watch: FetchStallWatch, writer: Writer, seconds: float) -> None:
    watch.last_check[id(writer)] -= seconds
    if id(writer) in watch.reseeked_at:
        watch.reseeked_at[id(writer)] -= seconds
    writer.last_message_at -= seconds
    writer.assignment_changed_at -= seconds


def test_a_quiet_writer_behind_the_log_end_is_sought_again_then_given_a_new_consumer():
    stalled = Writer(behind=500, quiet_for=30)
    watch = FetchStallWatch(stall_seconds=20)
    watch.check([stalled])
    watch.check([stalled])  # right after: nothing more until another quiet period has passed
    assert (stalled.flushes, stalled.remedies) == (1, ["reseek"])
    _a_quiet_period_later(watch, stalled, 21)
    watch.check([stalled])  # the seek fetched nothing either
    assert stalled.remedies == ["reseek", "rejoin"]


def test_a_writer_fed_after_its_reseek_is_sought_again_when_it_stalls_again():
    writer = Writer(behind=500, quiet_for=30)
    watch = FetchStallWatch(stall_seconds=20)
    watch.check([writer])
    writer.last_message_at = time.monotonic()  # the seek worked
    _a_quiet_period_later(watch, writer, 21)
    watch.check([writer])
    assert writer.remedies == ["reseek", "reseek"]


def test_a_writer_its_group_left_without_partitions_rejoins_only_when_nobody_writes_its_table():
    orphaned = Writer(behind=500, quiet_for=90, assigned_for=90)
    spare = Writer(behind=500, quiet_for=90, assigned_for=90, table_quiet_for=5)  # a peer writes the table
    revoked_lately = Writer(behind=500, quiet_for=90, assigned_for=30)
    for writer in (orphaned, spare, revoked_lately):
        writer.assigned = set()
    FetchStallWatch(stall_seconds=20, rejoin_seconds=60).check([orphaned, spare, revoked_lately])
    assert [w.remedies for w in (orphaned, spare, revoked_lately)] == [["rejoin"], [], []]


def test_a_spare_writer_asks_whether_its_table_is_left_behind_once_a_period_not_every_turn():
    spare = Writer(behind=500, quiet_for=90, assigned_for=90, table_quiet_for=5)  # a peer writes the table
    spare.assigned = set()
    watch = FetchStallWatch(stall_seconds=20, rejoin_seconds=60)
    for _ in range(3):  # idle turns of the poll loop, 0.1 s apart
        watch.check([spare])
    assert spare.asked_left_behind == 1
    _a_quiet_period_later(watch, spare, 61)
    watch.check([spare])
    assert (spare.asked_left_behind, spare.remedies) == (2, [])


def test_a_caught_up_recently_fed_or_just_assigned_writer_is_left_alone():
    caught_up = Writer(behind=0, quiet_for=30)
    fed = Writer(behind=500, quiet_for=1)
    # partitions given back a moment ago, after a broker outage that left it quiet for 40 s
    just_assigned = Writer(behind=500, quiet_for=40, assigned_for=0.1)
    FetchStallWatch(stall_seconds=20).check([caught_up, fed, just_assigned])
    assert [w.remedies for w in (caught_up, fed, just_assigned)] == [[], [], []]
    assert fed.flushes == 0 and just_assigned.flushes == 0


class _Unreachable:
    """A table whose catalog is away."""

    def refresh(self):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


class _Corrupt:
    def refresh(self):
        raise ValueError("a metadata file that does not parse")


def _writer_whose_table(table: object) -> SimpleNamespace:
    writer = SimpleNamespace(table=table, table_name="trades", settle=lambda: None)
    writer._left_behind = lambda seconds: TableWriter._left_behind(writer, seconds)
    return writer


def test_a_writer_cannot_tell_it_is_left_behind_while_its_catalog_is_away_and_does_not_act():
    assert TableWriter.left_behind(_writer_whose_table(_Unreachable()), 60) is False


def test_a_fault_that_waiting_does_not_mend_is_raised_not_taken_for_an_outage():
    with pytest.raises(ValueError, match="does not parse"):
        TableWriter.left_behind(_writer_whose_table(_Corrupt()), 60)
