"""The test-only crash points (stream writer, ingest) never fire in production (K2_MODE=prod)."""

from __future__ import annotations

import pytest

from k2.crash_points import ENV, CrashPoints
from k2.settings import Settings

pytestmark = pytest.mark.unit


def test_ignored_in_prod_mode(monkeypatch):
    monkeypatch.setenv(ENV, "after_files")
    points = CrashPoints(Settings(mode="prod"))
    for _ in range(3):
        points.reach("after_files")  # would SIGKILL the test run if armed
    assert points.point is None
    assert CrashPoints(Settings(mode="dev")).point == "after_files"


def test_unset_is_inert_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert CrashPoints(Settings()).point is None
    for value in ("after_file", "after_files@x", "before_files@", "after_commit@0"):
        monkeypatch.setenv(ENV, value)
        with pytest.raises(ValueError, match=ENV):
            CrashPoints(Settings())
    monkeypatch.setenv(ENV, "after_commit@3")
    points = CrashPoints(Settings())
    assert (points.point, points.remaining) == ("after_commit", 3)
