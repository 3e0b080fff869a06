"""Opaque page cursors: keyset positions pinned to table versions.

A cursor names the snapshot of each table its first page read (and, for catch-up, the snapshot it
started after), so later pages read exactly the same rows however many commits land in between;
and the last row returned, so the next page starts strictly after it. It also carries a fingerprint of the
request that made it: a cursor replayed with other filters is refused rather than silently
paging through a different result.

Cursors are base64url JSON, not signed: everything in one is something the client could ask for
directly anyway, and every value is validated and bound as a parameter when used.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from k2.query.errors import InvalidQuery
from k2.query.filters import EARLIEST, LATEST, micros

_VERSION = 1
_LATEST_US = micros(LATEST)


@dataclass(frozen=True)
class Position:
    """A row's place in tick order: (exchange_timestamp, symbol, sequence_number) is unique."""

    timestamp_us: int
    symbol: str
    sequence_number: int

    @property
    def timestamp(self) -> dt.datetime:
        return EARLIEST + dt.timedelta(microseconds=self.timestamp_us)


@dataclass(frozen=True)
class Cursor:
    snapshots: dict[str, int | None]  # role (a table kind, or "since") → snapshot id
    after: Position
    fingerprint: str

    def snapshot(self, role: str) -> int | None:
        return self.snapshots.get(role)

    def encode(self) -> str:
        payload = {"v": _VERSION, "s": self.snapshots,
                   "a": [self.after.timestamp_us, self.after.symbol, self.after.sequence_number],
                   "h": self.fingerprint}
        raw = json.dumps(payload, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, fingerprint: str) -> Cursor:
        """Parse a cursor made for the request with this `fingerprint`; anything else is a 422."""
        try:
            payload = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if payload.get("v") != _VERSION:
                raise ValueError("unknown cursor version")
            ts, symbol, seq = payload["a"]
            if not 0 <= _int(ts) < _LATEST_US:
                raise ValueError("position out of range")
            snapshots = {_str(role): _optional_int(sid) for role, sid in payload["s"].items()}
            cursor = cls(snapshots, Position(_int(ts), _str(symbol), _int(seq)), _str(payload["h"]))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError):
            raise InvalidQuery("cursor", "malformed cursor") from None
        if cursor.fingerprint != fingerprint:
            raise InvalidQuery("cursor", "this cursor belongs to a different query; repeat the original parameters")
        return cursor


def fingerprint(*parts: Any) -> str:
    """A short digest of the request parameters that define a paged result."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _int(value: Any) -> int:
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise ValueError("expected a 64-bit integer")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value
