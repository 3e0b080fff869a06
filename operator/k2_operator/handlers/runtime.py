"""What every handler shares: the API client and settings set at startup, one lock per resource,
status writes, Events, metrics, and applying rendered children.

Why status is written here and not through kopf's `patch`: three paths update a resource's status
— its own change handler, its drift timer, and the watch on its children (a deleted Deployment,
a changed replica count) — and all of them run under the same per-resource lock and write with
the same merge, so they cannot interleave half-updates.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
import structlog
from kubernetes.client.rest import ApiException

from k2 import observability
from k2.settings import Settings
from k2_operator import conditions
from k2_operator import config as operator_config
from k2_operator.conditions import Condition
from k2_operator.config import OperatorConfig
from k2_operator.kube import CHILD_KINDS, SERVICE_MONITOR_CRD, Applied, Kind, Kube, custom_kind
from k2_operator.models import KINDS, KindInfo
from k2_operator.render.common import MANAGED_BY, RenderContext

log = structlog.get_logger("k2_operator")

SKIP_CLEANUP_ANNOTATION = "k2.io/skip-external-cleanup"
# Not ready yet for an expected reason (a dependency is still being created): a Normal Event.
WAITING_REASONS = frozenset({"Reconciling", "TableNotFound", "TableNotReady", "SubjectNotFound", "SecretNotFound"})
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
    _ready: dict[tuple[str, str], bool] = field(default_factory=dict)
    _applied: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def lock(self, kind: str, namespace: str, name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault((kind, namespace, name), threading.RLock())

    def remember(self, child: Mapping[str, Any]) -> None:
        """The version of a child as the operator last applied it (to tell drift from our own writes)."""
        meta = child["metadata"]
        self._applied[(child["kind"], meta["namespace"], meta["name"])] = fingerprint(child)

    def applied_version(self, child: Mapping[str, Any]) -> str | None:
        meta = child["metadata"]
        return self._applied.get((child["kind"], meta["namespace"], meta["name"]))

    def render_context(self) -> RenderContext:
        return RenderContext.build(self.settings, self.config, service_monitor=self.service_monitor_available())

    def service_monitor_available(self) -> bool:
        """Whether the monitoring.coreos.com CRD is installed (re-checked once per drift interval,
        at most once a minute)."""
        checked_at, present = self._monitoring
        if time.monotonic() - checked_at > min(60.0, self.config.drift_interval):
            present = self.kube.crd_exists(SERVICE_MONITOR_CRD)
            self._monitoring = (time.monotonic(), present)
        return present

    def track_ready(self, kind: str, uid: str, ready: bool | None) -> None:
        """Keep `k2_operator_resources{kind,ready}` equal to what this operator last saw."""
        if ready is None:
            self._ready.pop((kind, uid), None)
        else:
            self._ready[(kind, uid)] = ready
        for info in KINDS:
            states = [v for (k, _), v in self._ready.items() if k == info.kind]
            observability.MANAGED_RESOURCES.labels(info.kind, "true").set(sum(states))
            observability.MANAGED_RESOURCES.labels(info.kind, "false").set(len(states) - sum(states))


def fingerprint(child: Mapping[str, Any]) -> str:
    """What changes when someone changes the object, but not when only its status moves:
    `generation` where the kind has one (Deployment, PDB, CronJob, Ingress), else `resourceVersion`."""
    meta = child["metadata"]
    return f"g{meta['generation']}" if meta.get("generation") else f"r{meta.get('resourceVersion')}"


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


# --- observability ----------------------------------------------------------------------------------
@contextlib.contextmanager
def reconciling(info: KindInfo, body: Mapping[str, Any], trigger: str) -> Iterator[structlog.BoundLogger]:
    """One reconcile of one resource: serialised with every other handler of that resource (the
    per-resource lock), timed and counted, with a bound logger; the outcome label says how it ended."""
    meta = body["metadata"]
    with get().lock(info.kind, meta["namespace"], meta["name"]), _observed(info, meta, trigger) as logger:
        yield logger


@contextlib.contextmanager
def _observed(info: KindInfo, meta: Mapping[str, Any], trigger: str) -> Iterator[structlog.BoundLogger]:
    logger = log.bind(kind=info.kind, namespace=meta.get("namespace"), name=meta.get("name"), trigger=trigger,
                      generation=meta.get("generation"))
    started = time.perf_counter()
    outcome = "success"
    try:
        yield logger
    except kopf.TemporaryError as exc:
        outcome = "retry"
        observability.RECONCILE_ERRORS.labels(info.kind, "temporary").inc()
        logger.warning("reconcile.retry", reason=str(exc))
        raise
    except Exception as exc:
        outcome = "error"
        observability.RECONCILE_ERRORS.labels(info.kind, type(exc).__name__).inc()
        logger.exception("reconcile.failed")
        raise
    finally:
        seconds = time.perf_counter() - started
        observability.RECONCILES.labels(info.kind, outcome).inc()
        observability.RECONCILE_DURATION.labels(info.kind).observe(seconds)
        logger.info("reconcile.done", outcome=outcome, seconds=round(seconds, 3))


def event(body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """A Kubernetes Event on the resource (kopf posts it asynchronously) and a log line."""
    meta = body["metadata"]
    log.info("event", kind=body.get("kind"), namespace=meta.get("namespace"), name=meta.get("name"),
             reason=reason, message=message, type="Warning" if warning else "Normal")
    try:
        kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message[:1000])
    except LookupError:  # outside a kopf context (unit tests, scripts): the log line is enough
        pass


# --- status -------------------------------------------------------------------------------------------
def write_status(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition], *, required: Sequence[str],
                 observed_state: Mapping[str, Any], ready_override: Condition | None = None,
                 announce: bool = True, remove: Sequence[str] = ()) -> Condition:
    """Merge `checks` (+ the derived Ready) into the resource's conditions and write the status.

    An Event is posted when Ready changes status or reason, so `kubectl describe` tells the story.
    """
    meta = body["metadata"]
    previous_status = dict(body.get("status") or {})
    previous = previous_status.get("conditions") or []
    ready = ready_override or conditions.summary(checks, required)
    merged = conditions.merge(previous, [*checks, ready], generation=meta.get("generation"), remove=remove)
    status = {**observed_state, "conditions": merged, "observedGeneration": meta.get("generation")}
    get().kube.patch_status(resource_kind(info), meta["namespace"], meta["name"], status)
    get().track_ready(info.kind, meta.get("uid", ""), ready.ok)
    _announce(body, previous, ready, announce)
    return ready


def conclude(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition], *, required: Sequence[str],
             observed_state: Mapping[str, Any], changes: Sequence[str], trigger: str, logger: Any,
             retry: bool, remove: Sequence[str] = ()) -> Condition:
    """How every reconcile ends: the status, an Event for what it changed, one log line, and a
    retry (kopf.TemporaryError) while it waits for something."""
    ready = write_status(info, body, checks, required=required, observed_state=observed_state, remove=remove)
    meta = body["metadata"]
    report_changes(body, changes, trigger,
                   spec_unchanged=(body.get("status") or {}).get("observedGeneration") == meta.get("generation"))
    logger.info(f"{info.kind.lower()}.reconciled", ready=ready.status, reason=ready.reason, changes=list(changes))
    if retry:
        raise kopf.TemporaryError(ready.message, delay=retry_delay(0))
    return ready


def report_changes(body: Mapping[str, Any], changes: Sequence[str], trigger: str, *, spec_unchanged: bool) -> None:
    """One Event per reconcile that changed something; a change nobody asked for is drift."""
    if not changes:
        return
    if trigger != "change" and spec_unchanged:
        event(body, "DriftRepaired", "; ".join(changes))
    else:
        event(body, "Reconciled", "; ".join(changes))


def patch_conditions(info: KindInfo, body: Mapping[str, Any], checks: Sequence[Condition],
                     observed_state: Mapping[str, Any]) -> None:
    """Update informational conditions (availability) and observed fields; Ready is left as it is."""
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions") or []
    merged = conditions.merge(previous, checks, generation=(body.get("status") or {}).get("observedGeneration"))
    get().kube.patch_status(resource_kind(info), meta["namespace"], meta["name"],
                            {**observed_state, "conditions": merged})


def _announce(body: Mapping[str, Any], previous: Sequence[Mapping[str, Any]], ready: Condition,
              announce: bool) -> None:
    before = conditions.find(previous, conditions.READY)
    if announce and (before is None or before.get("status") != ready.status or before.get("reason") != ready.reason):
        event(body, ready.reason if not ready.ok else "Ready", ready.message,
              warning=ready.status == "False" and ready.reason not in WAITING_REASONS)


# --- children -----------------------------------------------------------------------------------------
def owner_selector(info: KindInfo, name: str) -> str:
    return f"app.kubernetes.io/managed-by={MANAGED_BY},k2.io/{info.kind.lower()}={name}"


class ApplyFailed(kopf.TemporaryError):
    """The apiserver refused a child; reported as Ready=False ApplyFailed and retried."""


def apply_children(info: KindInfo, body: Mapping[str, Any], objects: list[dict[str, Any]],
                   prune_kinds: Sequence[str], *, keep: Sequence[str] = ()) -> tuple[list[Applied], list[str]]:
    """Adopt and server-side-apply `objects`; delete this owner's children of `prune_kinds` that are
    no longer rendered (unless named in `keep`). Returns what was applied and what was deleted.

    A refusal by the apiserver (a quota, an admission webhook, a missing CRD) is written to the
    status as Ready=False/ApplyFailed and retried with backoff."""
    try:
        return _apply_children(info, body, objects, prune_kinds, keep)
    except ApiException as exc:
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            detail = json.loads(exc.body).get("message", detail)
        message = f"applying children failed ({exc.status}): {detail}"
        write_status(info, body, [], required=(), observed_state={},
                     ready_override=Condition.false(conditions.READY, "ApplyFailed", message))
        raise ApplyFailed(message, delay=retry_delay(0)) from exc


def _apply_children(info: KindInfo, body: Mapping[str, Any], objects: list[dict[str, Any]],
                    prune_kinds: Sequence[str], keep: Sequence[str]) -> tuple[list[Applied], list[str]]:
    kube = get().kube
    kopf.adopt(objects, owner=body)  # ownerReferences (garbage collection), namespace, owner labels
    applied = [kube.apply(obj) for obj in objects]
    for result in applied:
        get().remember(result.body)
    wanted = {(o["kind"], o["metadata"]["name"]) for o in objects} | {(k, n) for k, n in (x.split("/") for x in keep)}
    pruned = []
    uid = body["metadata"]["uid"]
    for kind_name in prune_kinds:
        kind = CHILD_KINDS[kind_name]
        if kind_name == "ServiceMonitor" and not get().service_monitor_available():
            continue
        for child in kube.list(kind, body["metadata"]["namespace"], owner_selector(info, body["metadata"]["name"])):
            owned = any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])
            if owned and (kind_name, child["metadata"]["name"]) not in wanted:
                kube.delete(kind, child["metadata"]["namespace"], child["metadata"]["name"])
                pruned.append(f"{kind_name}/{child['metadata']['name']}")
    return applied, pruned


def describe_changes(applied: Sequence[Applied], pruned: Sequence[str]) -> list[str]:
    return ([f"created {a.ref}" for a in applied if a.created] + [f"updated {a.ref}" for a in applied
                                                                  if a.changed and not a.created]
            + [f"deleted {p}" for p in pruned])


def retry_delay(retry: int) -> float:
    """Exponential backoff from the configured base, capped at five minutes."""
    return min(get().config.retry_delay * (2 ** max(retry, 0)), 300.0)


def skip_cleanup(body: Mapping[str, Any]) -> bool:
    return (body["metadata"].get("annotations") or {}).get(SKIP_CLEANUP_ANNOTATION, "").lower() == "true"


def available_replicas(deployment: Mapping[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0)


def availability(type_: str, desired: int, available: int) -> Condition:
    if desired == 0:
        return Condition.true(type_, "ScaledToZero", "no replicas requested")
    if available >= desired:
        return Condition.true(type_, "MinimumReplicasAvailable", f"{available}/{desired} replicas available")
    return Condition.false(type_, "ReplicasUnavailable", f"{available}/{desired} replicas available")


def config_value(name: str) -> Any:
    """An `OperatorConfig` value at import time (kopf decorators need timer intervals then)."""
    return getattr(operator_config.load(), name)


def cleanup_failed(info: KindInfo, body: Mapping[str, Any], retry: int, exc: Exception,
                   logger: structlog.BoundLogger) -> None:
    """External cleanup failed: retry with backoff and say so on the resource; after the configured
    number of attempts give up, warn, and let the resource go (deletion never hangs forever)."""
    attempts = get().config.cleanup_attempts
    if retry + 1 >= attempts:
        event(body, "CleanupAbandoned", f"external cleanup failed {attempts} times, releasing the resource and "
              f"leaving external state in place: {exc}", warning=True)
        logger.warning("cleanup.abandoned", attempts=attempts, error=str(exc))
        return
    delay = retry_delay(retry)
    message = (f"external cleanup failed (attempt {retry + 1}/{attempts}, next in {delay:.0f}s): {exc}; "
               f"annotate {SKIP_CLEANUP_ANNOTATION}=true to release the resource without cleanup")
    write_status(info, body, [], required=(), observed_state={},
                 ready_override=Condition.false(conditions.READY, "CleanupFailed", message))
    raise kopf.TemporaryError(message, delay=delay)
