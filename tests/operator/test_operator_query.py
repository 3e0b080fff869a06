"""QueryService: no external state, so no finalizer; its children are still repaired (from the
child watch) and follow the spec — scale through the scale subresource, Ingress added/removed."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

FIELDS = [{"name": "pair", "type": "string", "required": True}]


@pytest.fixture(scope="module")
def served(cluster: Any, namespace: str, operator: Any) -> str:
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": "fx"},
                               "spec": {"namespace": f"q_{namespace[-6:]}", "name": "fx",
                                        "schema": {"fields": FIELDS}}})
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": "api"},
                               "spec": {"replicas": 1, "tables": [{"name": "fx"}],
                                        "ingress": {"host": "api.example.test"}}})
    cluster.wait_condition(namespace, "QueryService", "api", timeout=60)
    return "api"


def test_no_finalizer_without_external_state(cluster: Any, namespace: str, served: str) -> None:
    obj = cluster.get(namespace, "QueryService", served)

    assert not obj["metadata"].get("finalizers")
    assert obj["status"]["url"] == "http://api.example.test"


def test_scale_subresource_reaches_the_deployment(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    proc = cluster.kubectl("scale", "qs", served, "-n", namespace, "--replicas=3")
    assert proc.returncode == 0, proc.stderr

    cluster.wait_condition(namespace, "QueryService", served)
    k2op.wait_for(lambda: cluster.deployment(namespace, served).spec.replicas == 3, "3 API replicas", 20)


def test_deleted_children_are_recreated(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    cluster.apps.delete_namespaced_deployment(served, namespace)
    cluster.core.delete_namespaced_service(served, namespace)

    k2op.wait_for(lambda: cluster.deployment(namespace, served) is not None, "the Deployment back", 30)
    k2op.wait_for(lambda: cluster.kubectl("get", "svc", served, "-n", namespace).returncode == 0,
                  "the Service back", 30)
    k2op.wait_for(lambda: cluster.events(namespace, served, "DriftRepaired"), "a DriftRepaired event", 15)


def test_hand_edited_config_map_is_put_back(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    cluster.core.patch_namespaced_config_map(f"{served}-settings", namespace, {"data": {"K2_RATE_LIMIT": "1/day"}})

    k2op.wait_for(lambda: cluster.core.read_namespaced_config_map(f"{served}-settings", namespace)
                  .data["K2_RATE_LIMIT"] == "100/minute", "the ConfigMap restored", 30)


def test_removing_the_ingress_prunes_it(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    cluster.kubectl("get", "ingress", served, "-n", namespace, "-o", "json")
    cluster.patch(namespace, "QueryService", served, {"spec": {"ingress": None}})

    obj = cluster.wait_condition(namespace, "QueryService", served)
    k2op.wait_for(lambda: cluster.kubectl("get", "ingress", served, "-n", namespace).returncode != 0,
                  "the Ingress deleted", 20)
    assert obj["status"]["url"] == f"http://{served}.{namespace}.svc:80"
    assert "deleted Ingress/api" in json.dumps([e.message for e in cluster.events(namespace, served)])


def test_service_monitor_only_when_its_crd_exists(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    """With the Prometheus Operator's CRD present (a stand-in with an open schema if it is not
    installed), the API gets a ServiceMonitor; without it none is rendered (see the unit tests)."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(cluster.api)
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
           "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                    "names": {"plural": "servicemonitors", "singular": "servicemonitor", "kind": "ServiceMonitor"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
    installed_here = cluster.kubectl("get", "crd", crd["metadata"]["name"]).returncode != 0
    if installed_here:  # other suites may have installed the real one; never remove theirs
        ext.create_custom_resource_definition(crd)
    try:
        k2op.wait_for(lambda: cluster.kubectl("get", "servicemonitors", "-n", namespace).returncode == 0,
                      "the CRD to be served", 30)
        cluster.patch(namespace, "QueryService", served, {"spec": {"rateLimit": "60/minute"}})

        monitor = k2op.wait_for(lambda: json.loads(cluster.kubectl(
            "get", "servicemonitor", served, "-n", namespace, "-o", "json").stdout or "null"),
            "a ServiceMonitor for the API", 30)
        assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
        assert monitor["metadata"]["ownerReferences"][0]["kind"] == "QueryService"
    finally:
        if installed_here:
            ext.delete_custom_resource_definition("servicemonitors.monitoring.coreos.com")
    cluster.patch(namespace, "QueryService", served, {"spec": {"rateLimit": "100/minute"}})
    cluster.wait_condition(namespace, "QueryService", served, timeout=30)
