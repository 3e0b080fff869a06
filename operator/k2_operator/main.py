"""`k2 operator`: run the kopf operator in-cluster (ServiceAccount) or with the kubeconfig.

The same handlers run under `kopf.testing.KopfRunner` in the tests (`kopf run -m
k2_operator.handlers`); this module only adds process concerns: logging, namespaces, liveness, and
leader election (`k2_operator.leadership`: kopf starts only once this process holds the Lease).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

import kopf
import structlog

from k2.observability import configure_logging
from k2_operator import config as operator_config
from k2_operator import leadership
from k2_operator.kube import Kube

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


# Their defaults point at the local dev stack (127.0.0.1), which is never right inside a cluster.
REQUIRED_IN_CLUSTER = ("K2_KAFKA_BOOTSTRAP", "K2_REGISTRY_URL")


def missing_endpoints(environ: Mapping[str, str]) -> list[str]:
    """The endpoint variables an operator running in a cluster lacks."""
    if not environ.get("KUBERNETES_SERVICE_HOST"):
        return []
    return [name for name in REQUIRED_IN_CLUSTER if not environ.get(name)]


def run(namespaces: list[str] | None = None) -> None:
    """Watch `namespaces` (all namespaces when empty) until SIGTERM/SIGINT."""
    import k2_operator.handlers  # noqa: F401 - registers the handlers

    missing = missing_endpoints(os.environ)
    if missing:
        raise SystemExit(f"k2 operator: {', '.join(missing)} not set; in a cluster they must name your Kafka and "
                         "Schema Registry (Helm sets them from kafka/schemaRegistry values, kustomize from your "
                         "overlay's k2-operator-env)")

    configure_logging(json=True)
    json_stdlib_logging()
    asyncio.run(_lead_then_operate(list(namespaces or [])))


async def _lead_then_operate(namespaces: list[str]) -> None:
    """Hold the Lease (waiting as a standby until then), renew it while kopf runs, release it on exit."""
    cfg = operator_config.load()
    namespace = cfg.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
    elector = leadership.Elector(Kube.connect(), namespace=namespace, name=cfg.lease_name,
                                 duration=cfg.lease_duration)
    await elector.standby(cfg.liveness)
    # Lost to another replica: stop at once (kopf stops gracefully on SIGTERM).
    keeper = asyncio.create_task(elector.keep(on_lost=lambda: signal.raise_signal(signal.SIGTERM)))
    try:
        await kopf.operator(clusterwide=not namespaces, namespaces=namespaces, standalone=True,
                            liveness_endpoint=cfg.liveness or None)
    finally:
        keeper.cancel()
        await asyncio.get_running_loop().run_in_executor(None, elector.release)  # hand over at once
