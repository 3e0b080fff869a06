"""`k2 operator`: run the kopf operator in-cluster (ServiceAccount) or with the kubeconfig.

The same handlers run under `kopf.testing.KopfRunner` in the tests (`kopf run -m
k2_operator.handlers`); this module only adds process concerns: logging, namespaces, liveness.
"""

from __future__ import annotations

import asyncio
import logging

import kopf
import structlog

from k2.observability import configure_logging
from k2_operator import config as operator_config

# Chatty at INFO: one line per HTTP request to the registry, one per successful kopf handler.
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "kopf.objects", "kopf.activities.probe")


def json_stdlib_logging() -> None:
    """kopf and the libraries log through `logging`: render their records as the same JSON lines
    as structlog's, so one log pipeline parses everything the operator prints."""
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)])
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(namespaces: list[str] | None = None) -> None:
    """Watch `namespaces` (all namespaces when empty) until SIGTERM/SIGINT."""
    import k2_operator.handlers  # noqa: F401 - registers the handlers

    configure_logging(json=True)
    json_stdlib_logging()
    cfg = operator_config.load()
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=list(namespaces or []),
        standalone=True,
        liveness_endpoint=cfg.liveness or None,
    ))
