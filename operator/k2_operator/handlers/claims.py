"""Who owns a shared name (a Kafka topic, an Iceberg table): the oldest resource claiming it.

Each kind indexes its claims in kopf (`kopf.index`: key → the claims of every resource), so a
reconcile can tell, without I/O, whether an older resource already owns what it asks for; the
newer one then reports ResourceConflict and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Claim:
    """One resource's claim: the oldest wins. Creation times have one-second resolution, so within
    a second a resource already established (its status shows what it owns) wins, then namespace/name."""

    created: str
    unestablished: bool
    namespace: str
    name: str
    uid: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, namespace: str, name: str, meta: Mapping[str, Any], *, established: bool) -> Claim:
        return cls(meta.get("creationTimestamp") or "", not established, namespace, name, meta.get("uid") or "")


def owned_by_others(keys: Iterable[str], uid: str, index: Mapping[str, Any]) -> dict[str, Claim]:
    """key → the older resource that owns it, for each of `keys` owned by another than `uid`."""
    owners = {}
    for key in keys:
        owner = min(index.get(key) or [], default=None)
        if owner is not None and owner.uid != uid:
            owners[key] = owner
    return owners
