"""The operator's own metrics and log lines per reconcile, and the resources-by-readiness gauge."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
import structlog

from k2 import observability
from k2_operator.handlers import runtime
from k2_operator.models import KINDS, KindInfo

log = structlog.get_logger("k2_operator")


class CountedRetry(kopf.TemporaryError):
    """A retry that is a failure, not a wait (the apiserver refused a child, cleanup failed):
    counted in `k2_operator_reconcile_errors_total` under its class name."""


@contextlib.contextmanager
def reconciling(info: KindInfo, body: Mapping[str, Any], trigger: str) -> Iterator[structlog.BoundLogger]:
    """One reconcile of one resource: serialised with every other handler of that resource (the
    per-resource lock), timed and counted, with a bound logger; the outcome label says how it ended."""
    meta = body["metadata"]
    with runtime.get().lock(info.kind, meta["namespace"], meta["name"]), _observed(info, meta, trigger) as logger:
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
        # Waiting for a dependency (a table not Ready, Kafka restarting) is not an error: only a
        # refusal by the apiserver counts, so the reconcile-error alert means something is wrong.
        outcome = "retry"
        if isinstance(exc, CountedRetry):
            observability.RECONCILE_ERRORS.labels(info.kind, type(exc).__name__).inc()
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


def track_ready(kind: str, namespace: str, name: str, ready: bool | None) -> None:
    """Keep `k2_operator_resource_ready{kind,resource_namespace,resource}` and the per-kind counts
    `k2_operator_resources{kind,ready}` equal to what this operator last saw (None: gone)."""
    states = runtime.get().ready
    key = (kind, namespace, name)
    if ready is None:
        if states.pop(key, None) is not None:
            observability.RESOURCE_READY.remove(*key)
    else:
        states[key] = ready
        observability.RESOURCE_READY.labels(*key).set(1 if ready else 0)
    for info in KINDS:
        seen = [v for (k, _, _), v in states.items() if k == info.kind]
        observability.MANAGED_RESOURCES.labels(info.kind, "true").set(sum(seen))
        observability.MANAGED_RESOURCES.labels(info.kind, "false").set(len(seen) - sum(seen))


def forget_absent(present: set[tuple[str, str, str]]) -> None:
    """Drop the series of resources deleted without a delete handler (Retain, QueryService)."""
    for key in [k for k in runtime.get().ready if k not in present]:
        track_ready(*key, None)
