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


def track_ready(kind: str, uid: str, ready: bool | None) -> None:
    """Keep `k2_operator_resources{kind,ready}` equal to what this operator last saw (None: gone)."""
    states = runtime.get().ready
    if ready is None:
        states.pop((kind, uid), None)
    else:
        states[(kind, uid)] = ready
    for info in KINDS:
        seen = [v for (k, _), v in states.items() if k == info.kind]
        observability.MANAGED_RESOURCES.labels(info.kind, "true").set(sum(seen))
        observability.MANAGED_RESOURCES.labels(info.kind, "false").set(len(seen) - sum(seen))
