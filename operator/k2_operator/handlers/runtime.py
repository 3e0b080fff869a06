"""The process-wide state every handler shares, set once by the startup handler: the API client,
the workloads' default settings, the operator's own config, and one lock per resource.

Why one lock per resource: three paths reconcile a resource — its own change handler, the drift
loop, and the watch on its children — and they must not interleave half-updates of one status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2.settings import Settings
from k2_operator.config import OperatorConfig
from k2_operator.kube import SERVICE_MONITOR_CRD, Kind, Kube, custom_kind
from k2_operator.models import KindInfo
from k2_operator.render.common import Owner, RenderContext

FINALIZER = "k2.io/cleanup"
ANNOTATION_PREFIX = "k2.io"


@dataclass
class Runtime:
    kube: Kube
    settings: Settings
    config: OperatorConfig
    _locks: dict[tuple[str, str, str], threading.RLock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    _monitoring: tuple[float, bool] = (0.0, False)
    ready: dict[tuple[str, str, str], bool] = field(default_factory=dict)  # (kind, namespace, name)
    applied: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def lock(self, kind: str, namespace: str, name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault((kind, namespace, name), threading.RLock())

    def render_context(self) -> RenderContext:
        return RenderContext.build(self.settings, self.config, service_monitor=self.service_monitor_available())

    def service_monitor_available(self) -> bool:
        """Whether the monitoring.coreos.com CRD is installed (re-checked at most once a minute)."""
        checked_at, present = self._monitoring
        if time.monotonic() - checked_at > min(60.0, self.config.drift_interval):
            present = self.kube.crd_exists(SERVICE_MONITOR_CRD)
            self._monitoring = (time.monotonic(), present)
        return present


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get() -> Runtime:
    if _runtime is None:
        raise RuntimeError("the operator runtime is not started (the kopf startup handler sets it)")
    return _runtime


def resource_kind(info: KindInfo) -> Kind:
    return custom_kind(info.kind, info.plural)


def owner(info: KindInfo, body: Mapping[str, Any]) -> Owner:
    return Owner(kind=info.kind, name=body["metadata"]["name"], namespace=body["metadata"]["namespace"])
