"""Every kopf setting in one place, and the runtime (API client, settings) the handlers share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from k2 import observability
from k2.settings import Settings
from k2_operator import config as operator_config
from k2_operator.handlers import children, drift, runtime
from k2_operator.kube import CHILD_KINDS, Kube

_metrics_served: set[int] = set()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **indexes: Any) -> None:
    cfg = operator_config.load()
    # One finalizer and K2's own annotation prefix, instead of kopf's defaults; handler progress
    # lives in annotations so `status` stays exactly what the CRD schema describes.
    settings.persistence.finalizer = runtime.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=runtime.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=runtime.ANNOTATION_PREFIX, key="last-handled-configuration")
    # Only the Events the handlers post on purpose, not one per log line.
    settings.posting.enabled = True
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # Handlers are synchronous (confluent-kafka, pyiceberg, the kubernetes client): a thread pool.
    settings.execution.max_workers = cfg.workers
    # Re-establish watches regularly, so a silently dropped connection is noticed.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # One active replica through a Lease (`k2 operator`, see handlers/leadership.py), not kopf
    # peering, which would need kopf's own CRDs.
    settings.peering.standalone = True
    # Children are watched through a label selector the apiserver applies, so the operator is
    # not streamed every ConfigMap, Deployment, Job… of the cluster only to drop them.
    for kind in children.WATCHED:
        child = CHILD_KINDS[kind]
        group, _, version = child.api_version.rpartition("/")
        settings.watching.label_selectors[(group, version, child.plural)] = children.SELECTOR

    runtime.install(runtime.Runtime(kube=Kube.connect(), settings=Settings(), config=cfg))
    if cfg.metrics_port and cfg.metrics_port not in _metrics_served:
        observability.serve_metrics(cfg.metrics_port)
        _metrics_served.add(cfg.metrics_port)
    memo.drift_loop = asyncio.create_task(
        drift.run(indexes, interval=cfg.drift_interval, initial_delay=cfg.drift_initial_delay), name="k2 drift loop")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("drift_loop")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
