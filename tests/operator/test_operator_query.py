"""QueryService: no external state, so no finalizer; its children are still repaired (from the
child watch) and follow the spec — scale through the scale subresource, Ingress added/removed."""

from __future__ import annotations

import json
import uuid
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


def test_an_hpa_can_scale_the_query_service(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    """The scale subresource reports the pods' selector, so the HPA controller gets past reading the
    scale (without it: ScalingActive=False, InvalidSelector, "selector is required")."""
    scale = json.loads(cluster.kubectl("get", "--raw", f"/apis/k2.io/v1alpha1/namespaces/{namespace}/queryservices/"
                                       f"{served}/scale").stdout)
    pod_labels = cluster.deployment(namespace, served).spec.template.metadata.labels
    selector = dict(pair.split("=") for pair in scale["status"]["selector"].split(","))
    assert selector.items() <= pod_labels.items()

    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": served},
           "spec": {"scaleTargetRef": {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "name": served},
                    "minReplicas": 1, "maxReplicas": 4, "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}}
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(hpa))
    assert proc.returncode == 0, proc.stderr

    def conditions() -> dict[str, dict] | None:
        out = cluster.kubectl("get", "hpa", served, "-n", namespace, "-o", "json")
        found = {c["type"]: c for c in (json.loads(out.stdout).get("status") or {}).get("conditions") or []}
        return found if "ScalingActive" in found else None

    found = k2op.wait_for(conditions, "the HPA controller to evaluate the QueryService", 60, interval=1)
    assert found["AbleToScale"]["status"] == "True", found
    # No metrics server here: the HPA stops at reading metrics, past the selector.
    assert found["ScalingActive"]["reason"] != "InvalidSelector", found
    cluster.kubectl("delete", "hpa", served, "-n", namespace)


def test_a_rotated_secret_rolls_the_api_pods(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    """The API reads the catalog Secret through env: a new version of it changes the pod template."""
    def secrets_hash() -> str | None:
        return (cluster.deployment(namespace, served).spec.template.metadata.annotations or {}).get(
            "k2.io/secrets-hash")

    before = secrets_hash()
    assert before
    cluster.core.patch_namespaced_secret("k2-catalog", namespace, {"stringData": {"rotated": uuid.uuid4().hex}})

    k2op.wait_for(lambda: secrets_hash() not in (None, before), "the pod template to follow the Secret", 30)


def test_the_api_config_map_holds_the_registry_url_and_no_keys(cluster: Any, namespace: str, served: str,
                                                                operator_env: dict[str, str]) -> None:
    """The registry: its live stream decodes the ticks' Avro (the operator's default, a plain URL here)."""
    data = cluster.core.read_namespaced_config_map(f"{served}-settings", namespace).data
    pod = cluster.deployment(namespace, served).spec.template.spec

    assert data["K2_REGISTRY_URL"] == operator_env["K2_REGISTRY_URL"] and "K2_API_KEYS" not in data
    assert data["K2_API_KEYS_FILE"] == "/var/run/k2/api-keys-file/api_keys"
    assert any(v.secret and v.secret.secret_name == "k2-api-keys" for v in pod.volumes)


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
    k2op.wait_for(lambda: "deleted Ingress/api" in json.dumps([e.message for e in cluster.events(namespace, served)]),
                  "an event saying the Ingress was deleted", 15)


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


def test_an_invalid_value_the_schema_lets_through_is_a_condition(cluster: Any, namespace: str, operator: Any,
                                                                 k2op: Any) -> None:
    """A quantity is int-or-string to the apiserver; the model rejects a malformed one, and that ends
    as Ready=False/InvalidSpec naming the field, not as an exception retried forever."""
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": "bad"},
                               "spec": {"tables": [{"name": "fx"}], "resources": {"requests": {"cpu": "lots"}}}})

    obj = cluster.wait_condition(namespace, "QueryService", "bad", "Ready", "False", "InvalidSpec", timeout=30)

    message = k2op.find_condition(obj, "Ready")["message"]
    assert "spec.resources.requests" in message and "'lots' is not a Kubernetes quantity" in message
    assert cluster.deployment(namespace, "bad") is None
    cluster.delete(namespace, "QueryService", "bad")


def test_pausing_holds_every_change_until_resumed(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    """As Strimzi's strimzi.io/pause-reconciliation: nothing applied, nothing repaired, said in a condition."""
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": "held"},
                               "spec": {"replicas": 1, "tables": [{"name": "fx"}]}})
    cluster.wait_condition(namespace, "QueryService", "held", timeout=60)
    cluster.patch(namespace, "QueryService", "held", {"metadata": {"annotations": {
        "k2.io/pause-reconciliation": "true"}}})
    cluster.wait_condition(namespace, "QueryService", "held", "ReconciliationPaused", "True", generation=False)

    cluster.patch(namespace, "QueryService", "held", {"spec": {"replicas": 3}})
    cluster.apps.delete_namespaced_deployment("held", namespace)
    time_for_two_drift_rounds = 8
    with pytest.raises(AssertionError):
        k2op.wait_for(lambda: cluster.deployment(namespace, "held") is not None, "nothing while paused",
                      time_for_two_drift_rounds)

    cluster.patch(namespace, "QueryService", "held", {"metadata": {"annotations": {
        "k2.io/pause-reconciliation": None}}})
    k2op.wait_for(lambda: (d := cluster.deployment(namespace, "held")) is not None and d.spec.replicas == 3,
                  "the held change applied once resumed", 30)
    obj = cluster.wait_condition(namespace, "QueryService", "held", timeout=30)
    assert not k2op.find_condition(obj, "ReconciliationPaused")
    cluster.delete(namespace, "QueryService", "held")


def test_a_query_service_follows_its_tables_without_being_edited(cluster: Any, namespace: str, served: str,
                                                                  k2op: Any) -> None:
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": "brief"},
                               "spec": {"namespace": f"b_{namespace[-6:]}", "name": "brief",
                                        "schema": {"fields": FIELDS}}})
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": "follower"},
                               "spec": {"replicas": 1, "tables": [{"name": "brief"}]}})
    cluster.wait_condition(namespace, "QueryService", "follower", timeout=60)

    cluster.delete(namespace, "IcebergTable", "brief")

    obj = cluster.wait_condition(namespace, "QueryService", "follower", "TablesResolved", "False", "TableNotFound",
                                 timeout=30)
    assert "IcebergTable brief does not exist" in k2op.find_condition(obj, "TablesResolved")["message"]
    cluster.delete(namespace, "QueryService", "follower")


def test_shaped_pods_are_accepted_by_the_apiserver(cluster: Any, namespace: str, served: str, k2op: Any) -> None:
    """The pass-through fields (affinity, tolerations, …) reach the Deployment as the apiserver validates them."""
    shape = {"labels": {"team": "desk-a"}, "annotations": {"a/b": "c"},
             "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                 {"weight": 1, "preference": {"matchExpressions": [
                     {"key": "pool", "operator": "In", "values": ["market"]}]}}]}},
             "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                            "whenUnsatisfiable": "ScheduleAnyway",
                                            "labelSelector": {"matchLabels": {"team": "desk-a"}}}],
             "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "market", "effect": "NoSchedule"}],
             "nodeSelector": {"pool": "market"}, "priorityClassName": "k2-critical",
             "imagePullSecrets": [{"name": "regcred"}], "serviceAccountName": "default"}
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": "shaped"},
                               "spec": {"replicas": 1, "tables": [{"name": "fx"}], "pod": shape,
                                        "service": {"annotations": {"x/y": "z"}}}})
    cluster.wait_condition(namespace, "QueryService", "shaped", timeout=60)

    pod = cluster.deployment(namespace, "shaped").spec.template
    assert pod.metadata.labels["team"] == "desk-a" and pod.metadata.annotations["a/b"] == "c"
    assert pod.spec.node_selector == {"pool": "market"} and pod.spec.priority_class_name == "k2-critical"
    assert pod.spec.tolerations[0].key == "dedicated" and pod.spec.image_pull_secrets[0].name == "regcred"
    assert pod.spec.affinity.node_affinity and pod.spec.topology_spread_constraints[0].max_skew == 1
    assert cluster.core.read_namespaced_service("shaped", namespace).metadata.annotations == {"x/y": "z"}
    cluster.delete(namespace, "QueryService", "shaped")


def test_the_api_streams_the_topics_of_the_pipeline_writing_its_tables(cluster: Any, namespace: str,
                                                                       operator: Any, k2op: Any) -> None:
    """The live stream reads the topics the tables are written from: a QueryService over a
    pipeline's tables of another asset class streamed the default topics, and pushed nothing (kind)."""
    ex = uuid.uuid4().hex[:6]
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": f"t-{ex}"},
                               "spec": {"namespace": f"live_{ex}", "name": "trades", "schema": {"fields": FIELDS}}})
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IngestionPipeline",
                               "metadata": {"name": f"p-{ex}"}, "spec": {
                                   "exchange": "crypto", "assetClass": f"x{ex}", "source": {"type": "none"},
                                   "topics": {"kinds": ["trades"]}, "tables": [{"name": f"t-{ex}"}]}})
    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "metadata": {"name": f"q-{ex}"},
                               "spec": {"tables": [{"name": f"t-{ex}"}]}})

    def settings() -> dict[str, str] | None:
        try:
            return cluster.core.read_namespaced_config_map(f"q-{ex}-settings", namespace).data
        except Exception:  # noqa: BLE001 - not rendered yet
            return None
    data = k2op.wait_for(settings, "the QueryService's settings", 60)
    assert (data["K2_ASSET_CLASS"], data["K2_EXCHANGE"]) == (f"x{ex}", "crypto")
