"""Deletion never hangs: only resources with external cleanup to do (deletionPolicy Delete) carry a
finalizer, so with the operator stopped a Retain resource, and the namespace holding it, are
deleted by Kubernetes alone."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = [pytest.mark.operator, pytest.mark.timeout(240)]


def _namespace(cluster: Any, k2op: Any, catalog_dir: Any) -> str:
    name = f"k2del-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    cluster.core.create_namespaced_secret(name, client.V1Secret(
        metadata=client.V1ObjectMeta(name="k2-catalog"),
        data={k: base64.b64encode(v.encode()).decode() for k, v in k2op.catalog_secret_data(catalog_dir).items()}))
    return name


def _namespace_gone(cluster: Any, name: str) -> bool:
    try:
        cluster.core.read_namespace(name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_retain_resources_and_their_namespace_delete_with_the_operator_stopped(
        cluster: Any, crds: list[str], operator_env: dict, catalog_dir: Any, k2op: Any) -> None:
    ns = _namespace(cluster, k2op, catalog_dir)
    ex = f"d{uuid.uuid4().hex[:6]}"
    iceberg = {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": "kept"},
               "spec": {"namespace": f"d_{ex}", "name": "kept",
                        "schema": {"fields": [{"name": "pair", "type": "string"}]}}}
    dropped = {**iceberg, "metadata": {"name": "dropped"},
               "spec": {**iceberg["spec"], "name": "dropped", "deletionPolicy": "Delete"}}
    pipeline = {"apiVersion": "k2.io/v1alpha1", "kind": "IngestionPipeline", "metadata": {"name": "feed"},
                "spec": {"exchange": "asx", "assetClass": f"t{ex}", "topics": {"kinds": ["trades", "quotes"]}}}

    with KopfRunner(k2op.operator_args(ns), timeout=60) as runner:
        for body in (iceberg, dropped, pipeline):
            cluster.create(ns, body)
        for kind, name in (("IcebergTable", "kept"), ("IcebergTable", "dropped"), ("IngestionPipeline", "feed")):
            cluster.wait_condition(ns, kind, name, timeout=60)
        # Only the resource whose deletion removes something outside Kubernetes is held back for it.
        assert k2op.wait_for(lambda: cluster.get(ns, "IcebergTable", "dropped")["metadata"].get("finalizers"),
                             "the Delete policy's finalizer", 20) == ["k2.io/cleanup"]
        assert not cluster.get(ns, "IcebergTable", "kept")["metadata"].get("finalizers")
        assert not cluster.get(ns, "IngestionPipeline", "feed")["metadata"].get("finalizers")
        # Switching a resource to Delete adds the finalizer, switching back removes it again.
        cluster.patch(ns, "IcebergTable", "kept", {"spec": {"deletionPolicy": "Delete"}})
        k2op.wait_for(lambda: cluster.get(ns, "IcebergTable", "kept")["metadata"].get("finalizers"),
                      "a finalizer once the policy is Delete", 20)
        cluster.patch(ns, "IcebergTable", "kept", {"spec": {"deletionPolicy": "Retain"}})
        k2op.wait_for(lambda: not cluster.get(ns, "IcebergTable", "kept")["metadata"].get("finalizers"),
                      "the finalizer removed once the policy is Retain again", 20)
        cluster.delete(ns, "IcebergTable", "dropped")
        cluster.wait_gone(ns, "IcebergTable", "dropped", 30)
    assert runner.exception is None

    # The operator is stopped: the Retain resources and their namespace go without it.
    cluster.delete(ns, "IcebergTable", "kept")
    cluster.delete(ns, "IngestionPipeline", "feed")
    cluster.wait_gone(ns, "IcebergTable", "kept", 20)
    cluster.wait_gone(ns, "IngestionPipeline", "feed", 20)
    cluster.core.delete_namespace(ns)
    k2op.wait_for(lambda: _namespace_gone(cluster, ns), f"namespace {ns} to be deleted", 120, interval=1)
