"""Kubernetes Events on a custom resource: what `kubectl describe` shows of its history.

Posted with the operator's own client rather than `kopf.event`, which only works inside a kopf
handler: the drift loop (`handlers/drift.py`) runs outside any handler and must report too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from kubernetes.client.rest import ApiException

from k2_operator import conditions
from k2_operator.handlers import runtime
from k2_operator.kube import EVENT
from k2_operator.render.common import MANAGED_BY

log = structlog.get_logger("k2_operator")


def event(body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """A Kubernetes Event on the resource and a log line; an Event that cannot be posted is only logged."""
    meta = body["metadata"]
    type_ = "Warning" if warning else "Normal"
    log.info("event", kind=body.get("kind"), namespace=meta.get("namespace"), name=meta.get("name"),
             reason=reason, message=message, type=type_)
    now = conditions.now()
    manifest = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "reason": reason, "message": message[:1000], "type": type_, "count": 1,
        "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": MANAGED_BY}, "reportingComponent": MANAGED_BY,
    }
    try:
        runtime.get().kube.create(EVENT, meta["namespace"], manifest)
    except (ApiException, RuntimeError) as exc:  # RuntimeError: no runtime (unit tests, scripts)
        log.warning("event.not_posted", reason=reason, error=str(exc))
