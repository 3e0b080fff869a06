"""An operator stopped in the middle of reconciling — its create handler still retrying, the spec
changed and a child deleted while it was down — converges after a restart, without duplicates."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kopf.testing import KopfRunner

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]


def test_restart_mid_reconcile_converges(cluster: Any, namespace: str, operator_env: dict, admin: Any,
                                         asset_class: str, k2op: Any) -> None:
    ex = f"r{uuid.uuid4().hex[:6]}"
    trades_subject = f"market.{asset_class}{ex}.trades.asx-value"
    table = {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": "restart-trades"},
             "spec": {"namespace": f"r_{ex}", "name": "trades", "schema": {"fromSubject": trades_subject},
                      "partitionBy": [{"column": "exchange_date"}]}}
    pipeline = {"apiVersion": "k2.io/v1alpha1", "kind": "IngestionPipeline", "metadata": {"name": "restart"},
                "spec": {"exchange": "asx", "assetClass": f"{asset_class}{ex}", "source": {"type": "synthetic"},
                         "topics": {"kinds": ["trades", "quotes", "reference"]},
                         "tables": [{"name": "restart-trades"}]}}

    with KopfRunner(k2op.operator_args(namespace), timeout=60) as first:
        cluster.create(namespace, pipeline)
        # The pipeline's first pass ends waiting for its table, which does not exist yet: stop there.
        cluster.wait_condition(namespace, "IngestionPipeline", "restart", "TablesResolved", "False", "TableNotFound")
    assert first.exception is None

    obj = cluster.get(namespace, "IngestionPipeline", "restart")
    assert any(key.startswith("k2.io/") and "pipeline_changed" in key
               for key in obj["metadata"].get("annotations", {})), "the create handler was mid-retry"
    cluster.create(namespace, table)
    cluster.patch(namespace, "IngestionPipeline", "restart", {"spec": {"consumer": {"replicas": 2},
                                                                       "topics": {"partitions": 8}}})
    cluster.core.delete_namespaced_config_map("restart-settings", namespace)

    with KopfRunner(k2op.operator_args(namespace), timeout=60) as second:
        obj = cluster.wait_condition(namespace, "IngestionPipeline", "restart", timeout=60)
        k2op.wait_for(lambda: not [k for k in cluster.get(namespace, "IngestionPipeline", "restart")["metadata"]
                                   .get("annotations", {}) if "pipeline_changed" in k],
                      "kopf's progress annotations to be cleared", 20)
    assert second.exception is None

    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert cluster.deployment(namespace, "restart-consumer").spec.replicas == 2
    assert k2op.topic_partitions(admin, f"market.{asset_class}{ex}.trades.asx") == 8
    assert cluster.core.read_namespaced_config_map("restart-settings", namespace).data["K2_TOPIC_PARTITIONS"] == "8"
    selector = "k2.io/ingestionpipeline=restart"
    assert len(cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items) == 1
    assert len(cluster.batch.list_namespaced_job(namespace, label_selector=selector).items) == 1
    assert k2op.find_condition(cluster.get(namespace, "IcebergTable", "restart-trades"), "Ready")["status"] == "True"
