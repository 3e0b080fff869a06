"""Deletion of external state (deletionPolicy Delete): when it runs, how it is skipped, and how a
failing cleanup gives up instead of holding the resource forever."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from k2_operator import conditions
from k2_operator.conditions import Condition
from k2_operator.handlers import backoff, metrics, runtime
from k2_operator.handlers.events import event
from k2_operator.handlers.status import write_status
from k2_operator.models import KindInfo

SKIP_CLEANUP_ANNOTATION = "k2.io/skip-external-cleanup"


class CleanupFailed(metrics.CountedRetry):
    """External cleanup failed this attempt; retried with backoff, then abandoned."""


def deletes_external(spec: Mapping[str, Any], **_: Any) -> bool:
    """kopf `when=` filter: only deletionPolicy Delete has anything outside Kubernetes to remove."""
    return spec.get("deletionPolicy") == "Delete"


def skip_cleanup(body: Mapping[str, Any]) -> bool:
    return (body["metadata"].get("annotations") or {}).get(SKIP_CLEANUP_ANNOTATION, "").lower() == "true"


def cleanup_failed(info: KindInfo, body: Mapping[str, Any], retry: int, exc: Exception,
                   logger: structlog.BoundLogger) -> None:
    """External cleanup failed: retry with backoff and say so on the resource; after the configured
    number of attempts give up, warn, and let the resource go (deletion never hangs forever)."""
    attempts = runtime.get().config.cleanup_attempts
    if retry + 1 >= attempts:
        event(body, "CleanupAbandoned", f"external cleanup failed {attempts} times, releasing the resource and "
              f"leaving external state in place: {exc}", warning=True)
        logger.warning("cleanup.abandoned", attempts=attempts, error=str(exc))
        return
    delay = backoff.retry_delay(retry)
    message = (f"external cleanup failed (attempt {retry + 1}/{attempts}, next in {delay:.0f}s): {exc}; "
               f"annotate {SKIP_CLEANUP_ANNOTATION}=true to release the resource without cleanup")
    write_status(info, body, [], required=(), observed_state={},
                 ready_override=Condition.false(conditions.READY, "CleanupFailed", message))
    raise CleanupFailed(message, delay=delay)
