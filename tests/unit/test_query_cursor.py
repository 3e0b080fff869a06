"""Opaque cursors: round trips, and every kind of tampering refused as a 422 on `cursor`."""

from __future__ import annotations

import base64
import json

import pytest

from k2.query.cursor import Cursor, Position, fingerprint
from k2.query.errors import InvalidQuery

pytestmark = pytest.mark.unit
FP = fingerprint("trades", ("BHP",), None)


def _forge(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_round_trip() -> None:
    cursor = Cursor({"trades": 7316610256339965366, "since": None}, Position(1394406006717000, "BHP", 42), FP)
    decoded = Cursor.decode(cursor.encode(), FP)
    assert decoded == cursor
    assert decoded.snapshot("trades") == 7316610256339965366 and decoded.snapshot("quotes") is None
    assert decoded.after.timestamp.isoformat() == "2014-03-09T23:00:06.717000+00:00"


def test_fingerprints_tell_queries_apart() -> None:
    assert fingerprint("trades", ("BHP",), None) == FP
    assert fingerprint("trades", ("RIO",), None) != FP
    assert fingerprint("quotes", ("BHP",), None) != FP


@pytest.mark.parametrize("text", [
    "",
    "not base64 at all!",
    _forge([1, 2, 3]),
    _forge({"v": 2, "s": {}, "a": [1, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {"trades": "1"}, "a": [1, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {"trades": 2**64}, "a": [1, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {}, "a": [-1, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {}, "a": [2**62, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {}, "a": [1, 7, 1], "h": FP}),
    _forge({"v": 1, "s": {}, "a": [1, "BHP"], "h": FP}),
    _forge({"v": 1, "s": [], "a": [1, "BHP", 1], "h": FP}),
    _forge({"v": 1, "s": {}, "a": [1, "BHP", True], "h": FP}),
])
def test_malformed_cursors_are_refused(text: str) -> None:
    with pytest.raises(InvalidQuery, match="malformed cursor") as refused:
        Cursor.decode(text, FP)
    assert refused.value.field == "cursor"


def test_a_cursor_of_another_query_is_refused() -> None:
    text = Cursor({"trades": 1}, Position(1, "BHP", 1), fingerprint("trades", ("RIO",), None)).encode()
    with pytest.raises(InvalidQuery, match="different query"):
        Cursor.decode(text, FP)
