"""The K2 feed protocol (k2-feed/1): JSON text frames over WebSocket, documented in docs/feed-protocol.md.

This module is the protocol, both ways: `encode_*` turns canonical K2 records into messages (the
simulator), `K2FeedAdapter` turns messages back into records (`k2 ingest feed`). A vendor's feed
is another adapter with the same two methods (`subscribe`, `decode`), registered in `ADAPTERS`;
nothing else in K2 learns its message shapes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from k2.settings import TableKind
from k2.sources.asx import RowError, micros_to_decimal_str, parse_price, parse_size, unscaled_bytes

PROTOCOL = "k2-feed/1"
CHANNELS: dict[str, TableKind] = {"trades": "trades", "quotes": "quotes"}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DAY = dt.date(1970, 1, 1)


class MalformedMessage(RowError):
    """A message the adapter cannot turn into a record; `reason` is the DLQ's short code (a file
    row's RowError, said of a feed's message)."""


@dataclass(frozen=True, slots=True)
class Tick:
    kind: TableKind
    record: dict[str, Any]  # the kind's physical Avro record, without ingest_timestamp/source_id
    sent: float | None  # the server's clock when it sent the message (Unix seconds), if it says


@dataclass(frozen=True, slots=True)
class Control:
    """Anything but a tick: hello, subscribed, unsubscribed, heartbeat, end, error."""

    type: str
    body: dict[str, Any]


class FeedAdapter(Protocol):
    def subscribe(self, channels: Sequence[str], symbols: Sequence[str]) -> list[str]:
        """The frames that subscribe to these channels and symbols (`*`: every symbol)."""
        ...

    def decode(self, frame: str | bytes) -> list[Tick | Control]:
        """One frame → its ticks and control messages; raises MalformedMessage."""
        ...


# --- encoding (the simulator) ----------------------------------------------------------------
def iso_micros(us: int) -> str:
    return (_EPOCH + dt.timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")


def encode_tick(kind: TableKind, record: dict[str, Any], sent: float | None = None) -> dict[str, Any]:
    """A canonical record (as `k2.sources.asx.RecordBuilder` makes it) → its protocol message."""
    message: dict[str, Any] = {
        "type": "trade" if kind == "trades" else "quote",
        "symbol": record["symbol"], "exchange": record["exchange"],
        "date": (_EPOCH_DAY + dt.timedelta(days=record["exchange_date"])).isoformat(),
        "seq": record["sequence_number"], "time": iso_micros(record["exchange_timestamp"]),
    }
    if kind == "trades":
        message.update(price=micros_to_decimal_str(int.from_bytes(record["price"], "big", signed=True)),
                       volume=record["volume"], qualifiers=record["qualifiers"], venue=record["venue"],
                       buyer_id=record["buyer_id"])
    else:
        message.update(bid=micros_to_decimal_str(int.from_bytes(record["bid_price"], "big", signed=True)),
                       ask=micros_to_decimal_str(int.from_bytes(record["ask_price"], "big", signed=True)),
                       bid_size=record["bid_size"], ask_size=record["ask_size"])
    if sent is not None:
        message["sent"] = round(sent, 6)
    return message


def control(type_: str, **body: Any) -> str:
    return json.dumps({"type": type_, **body})


# --- decoding (k2 ingest feed) ---------------------------------------------------------------
def _field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedMessage("bad_field", f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _optional_text(message: dict[str, Any], name: str) -> str | None:
    value = message.get(name)
    if value is not None and not isinstance(value, str):
        raise MalformedMessage("bad_field", f"{name} must be a string or null, got {value!r}")
    return value or None


def _price(message: dict[str, Any], name: str) -> bytes:
    text = _field(message, name, str)  # decimal strings: a JSON number would pass through a float
    try:
        return unscaled_bytes(parse_price(text, name))
    except RowError as exc:
        raise MalformedMessage(exc.reason, str(exc)) from None


def _size(message: dict[str, Any], name: str) -> int:
    value = _field(message, name, int)
    try:
        return parse_size(str(value), name)
    except RowError as exc:
        raise MalformedMessage(exc.reason, str(exc)) from None


def _common(message: dict[str, Any]) -> dict[str, Any]:
    """The key fields, as the message gives them: whether they fit the pipeline's exchange is
    `k2 ingest feed`'s check (`Exchange.misfit`), the same for every adapter."""
    code = _field(message, "exchange", str)
    symbol = _field(message, "symbol", str)
    seq = _field(message, "seq", int)
    if seq < 1:
        raise MalformedMessage("bad_sequence", f"seq must be 1 or more, got {seq}")
    try:
        instant = dt.datetime.fromisoformat(_field(message, "time", str))
        day = dt.date.fromisoformat(_field(message, "date", str))
    except ValueError as exc:
        raise MalformedMessage("bad_time", f"time/date: {exc}") from None
    if instant.tzinfo is None:
        raise MalformedMessage("bad_time", "time must carry a UTC offset")
    return {"symbol": symbol, "exchange": code,
            "exchange_timestamp": (instant - _EPOCH) // dt.timedelta(microseconds=1),
            "exchange_date": (day - _EPOCH_DAY).days, "sequence_number": seq}


def _trade(message: dict[str, Any]) -> dict[str, Any]:
    record = _common(message)
    record.update(price=_price(message, "price"), volume=_size(message, "volume"),
                  qualifiers=_optional_text(message, "qualifiers"), venue=_optional_text(message, "venue"),
                  buyer_id=_optional_text(message, "buyer_id"))
    return record


def _quote(message: dict[str, Any]) -> dict[str, Any]:
    record = _common(message)
    bid, ask = _price(message, "bid"), _price(message, "ask")
    record.update(bid_price=bid, ask_price=ask, bid_size=_size(message, "bid_size"),
                  ask_size=_size(message, "ask_size"))
    b, a = int.from_bytes(bid, "big", signed=True), int.from_bytes(ask, "big", signed=True)
    record.update(is_one_sided=b == 0 or a == 0, is_crossed=b > a > 0)
    return record


_TICKS: dict[str, tuple[TableKind, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "trade": ("trades", _trade), "quote": ("quotes", _quote)}
CONTROL_TYPES = frozenset({"hello", "subscribed", "unsubscribed", "heartbeat", "end", "error"})


class K2FeedAdapter:
    """The reference protocol: what `k2 feed serve` speaks."""

    def subscribe(self, channels: Sequence[str], symbols: Sequence[str]) -> list[str]:
        return [control("subscribe", channels=list(channels), symbols=list(symbols))]

    def decode(self, frame: str | bytes) -> list[Tick | Control]:
        try:
            message = json.loads(frame)
        except ValueError as exc:
            raise MalformedMessage("not_json", f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise MalformedMessage("not_an_object", f"expected a JSON object, got {type(message).__name__}")
        kind = message.get("type")
        if kind in _TICKS:
            table, decode = _TICKS[kind]
            sent = message.get("sent")
            return [Tick(table, decode(message), float(sent) if isinstance(sent, int | float) else None)]
        if kind in CONTROL_TYPES:
            return [Control(kind, message)]
        raise MalformedMessage("unknown_type", f"unknown message type {kind!r}")


ADAPTERS: dict[str, type[FeedAdapter]] = {"k2": K2FeedAdapter}


class FeedSource:
    """`k2 ingest feed`: a live WebSocket feed, run until stopped, read through an adapter of `ADAPTERS`."""

    name = "feed"
    command: tuple[str, ...] = ("ingest", "feed")
    continuous = True
    description = "a live WebSocket feed (the K2 feed protocol or a vendor adapter)"
