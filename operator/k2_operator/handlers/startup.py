"""Every kopf setting in one place, and the runtime (API client, settings) the handlers share."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from k2 import observability
from k2.settings import Settings
from k2_operator import config as operator_config
from k2_operator.handlers import runtime
from k2_operator.kube import Kube

_metrics_served: set[int] = set()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    # A dead operator replica must not block deletions: no peering, one active replica.
    settings.peering.standalone = True

    runtime.install(runtime.Runtime(kube=Kube.connect(), settings=Settings(), config=cfg))
    if cfg.metrics_port and cfg.metrics_port not in _metrics_served:
        observability.serve_metrics(cfg.metrics_port)
        _metrics_served.add(cfg.metrics_port)
