"""What a resource refers to, resolved the same way for every kind: the registry URL (perhaps from
a Secret) and the IcebergTables it writes or serves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from k2_operator import conditions
from k2_operator.conditions import Condition
from k2_operator.handlers import runtime
from k2_operator.models import TABLE, IcebergTableSpec, LocalObjectReference, SchemaRegistryRef

TABLES_RESOLVED = "TablesResolved"


class Waiting(Exception):
    """A dependency (Secret, subject, table) is not there yet: report the reason, retry soon."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def registry_url(namespace: str, ref: SchemaRegistryRef | None) -> str:
    """The registry a resource names (a Secret key wins over a URL), else the operator's default."""
    rt = runtime.get()
    if ref and ref.secret_ref:
        data = rt.kube.secret_data(namespace, ref.secret_ref.name) or {}
        if ref.secret_ref.key not in data:
            raise Waiting("SecretNotFound", f"Secret {ref.secret_ref.name} has no key {ref.secret_ref.key}")
        return data[ref.secret_ref.key]
    return ref.url if ref and ref.url else rt.settings.registry_url


@dataclass(frozen=True)
class Tables:
    """The outcome of resolving table references: the specs (None unless all resolved), the
    TablesResolved condition, and whether waiting may help."""

    specs: tuple[IcebergTableSpec, ...] | None
    condition: Condition
    waiting: bool = False


def _unresolved(reason: str, message: str, *, waiting: bool) -> Tables:
    return Tables(None, Condition.false(TABLES_RESOLVED, reason, message), waiting)


def resolve_tables(namespace: str, refs: Sequence[LocalObjectReference], *,
                   invalid: Callable[[str, IcebergTableSpec], str | None] = lambda _name, _spec: None) -> Tables:
    """Every referenced IcebergTable must exist, pass `invalid` (a message says why not), be Ready,
    and share one catalog and Iceberg namespace with the others."""
    kube = runtime.get().kube
    found: list[IcebergTableSpec] = []
    for ref in refs:
        body = kube.get(runtime.resource_kind(TABLE), namespace, ref.name)
        if body is None:
            return _unresolved("TableNotFound", f"IcebergTable {ref.name} does not exist", waiting=True)
        spec = IcebergTableSpec.model_validate(body["spec"])
        problem = invalid(ref.name, spec)
        if problem:
            return _unresolved("InvalidTableReference", problem, waiting=False)
        if not conditions.is_ready(body.get("status")):
            return _unresolved("TableNotReady", f"IcebergTable {ref.name} is not Ready yet", waiting=True)
        found.append(spec)
    if len({(t.namespace, t.catalog_ref.name) for t in found}) > 1:
        return _unresolved("InvalidTableReference",
                           "the referenced IcebergTables must share one catalogRef and namespace", waiting=False)
    return Tables(tuple(found), Condition.true(TABLES_RESOLVED, "Resolved",
                                               ", ".join(t.identifier for t in found)))
