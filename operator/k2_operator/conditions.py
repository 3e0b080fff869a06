"""Status conditions, built one way for every kind (Kubernetes API conventions).

A handler decides *what* is true (`Condition(type, ok, reason, message)`); this module turns that
into the wire form, keeping `lastTransitionTime` unless the status really changed, stamping
`observedGeneration`, and deriving the summary `Ready` from the conditions a kind requires.
Pure functions: the clock is a parameter, so the tests need no time travel.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

READY = "Ready"
SYNCED = "Synced"
Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str = ""

    @classmethod
    def true(cls, type: str, reason: str, message: str = "") -> Condition:
        return cls(type, "True", reason, message)

    @classmethod
    def false(cls, type: str, reason: str, message: str = "") -> Condition:
        return cls(type, "False", reason, message)

    @classmethod
    def unknown(cls, type: str, reason: str, message: str = "") -> Condition:
        return cls(type, "Unknown", reason, message)

    @property
    def ok(self) -> bool:
        return self.status == "True"


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(conditions: Sequence[Condition], required: Sequence[str], ready_message: str = "reconciled", *,
            type_: str = SYNCED) -> Condition:
    """`Synced` (by default) is True when every required condition is; otherwise it carries the
    first failure."""
    by_type = {c.type: c for c in conditions}
    for required_type in required:
        condition = by_type.get(required_type)
        if condition is None:
            return Condition.unknown(type_, "Reconciling", f"{required_type} not yet determined")
        if not condition.ok:
            status: Status = "False" if condition.status == "False" else "Unknown"
            return Condition(type_, status, condition.reason, f"{required_type}: {condition.message}")
    return Condition.true(type_, "Reconciled", ready_message)


def readiness(synced: Condition, serving: Sequence[Mapping[str, Any] | None]) -> Condition:
    """`Ready`: Synced, and every serving condition (pods available, consumers caught up) True. A
    resource whose spec is applied but whose pods do not run, or run far behind, is Synced, not
    Ready; one whose serving state cannot be told (Kafka not answering) is Unknown."""
    if not synced.ok:
        return Condition(READY, synced.status, synced.reason, synced.message)
    for condition in serving:
        if condition is not None and condition.get("status") != "True":
            status: Status = "Unknown" if condition.get("status") == "Unknown" else "False"
            return Condition(READY, status, condition.get("reason") or "NotServing",
                             f"{condition.get('type')}: {condition.get('message', '')}")
    return Condition.true(READY, synced.reason, synced.message)


def merge(existing: Iterable[dict[str, Any]] | None, updates: Iterable[Condition], *, generation: int | None,
          timestamp: str | None = None, remove: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The new `status.conditions`: `updates` replace conditions of their type, `remove` drops
    types that no longer apply, others stay.

    `lastTransitionTime` only moves when the status changes (a new reason or message alone is not
    a transition); the order is stable (existing order, then new types, `Ready` first).
    """
    stamp = timestamp or now()
    dropped = set(remove)
    current = {c["type"]: dict(c) for c in existing or [] if isinstance(c, dict) and "type" in c
               and c["type"] not in dropped}
    order = list(current)
    for update in updates:
        previous = current.get(update.type)
        transition = stamp if previous is None or previous.get("status") != update.status \
            else previous.get("lastTransitionTime", stamp)
        entry: dict[str, Any] = {"type": update.type, "status": update.status, "reason": update.reason,
                                 "message": update.message, "lastTransitionTime": transition}
        if generation is not None:
            entry["observedGeneration"] = generation
        current[update.type] = entry
        if update.type not in order:
            order.append(update.type)
    order.sort(key=lambda t: t != READY)
    return [current[t] for t in order]


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_ready(status: dict[str, Any] | None) -> bool:
    ready = find((status or {}).get("conditions"), READY)
    return bool(ready and ready.get("status") == "True")
