"""The local control plane is a real Kubernetes: CRDs with schema and CEL validation, kubectl,
RBAC, and the controllers that own ReplicaSets and collect garbage."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from k2.stack.kube import kube_services, kubeconfig_path

# The first run builds etcd and Kubernetes inside the fixture; each test itself is quick.
pytestmark = [pytest.mark.operator, pytest.mark.timeout(120, func_only=True)]

GROUP = f"t{uuid.uuid4().hex[:8]}.k2.example"
PLURAL = "widgets"


@pytest.fixture(scope="module")
def api() -> Iterator[client.ApiClient]:
    started = []
    try:
        for service in kube_services():
            if service.pid() is None:  # a cluster the developer already runs is left running
                started.append(service)
            service.start()
        with config.new_client_from_config(config_file=str(kubeconfig_path())) as api_client:
            yield api_client
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"k2-test-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def crd(api: client.ApiClient, k2op: Any) -> Iterator[str]:
    """A namespaced Widget kind: `spec.size` required, CEL keeps `spec.replicas <= spec.size`."""
    name = f"{PLURAL}.{GROUP}"
    spec_schema = {
        "type": "object",
        "required": ["size"],
        "properties": {"size": {"type": "integer", "minimum": 1},
                       "replicas": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "!has(self.replicas) || self.replicas <= self.size",
                                      "message": "replicas must not exceed size"}],
    }
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "required": ["spec"],
                                               "properties": {"spec": spec_schema}}},
            }],
        },
    }
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(body)
    k2op.wait_for(lambda: any(c.type == "Established" and c.status == "True"
                         for c in ext.read_custom_resource_definition(name).status.conditions or []),
             "CRD established")
    yield name
    ext.delete_custom_resource_definition(name)


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", f"--kubeconfig={kubeconfig_path()}", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def widget(name: str, spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_kubectl_applies_a_custom_object(api: client.ApiClient, crd: str, namespace: str,
                                         tmp_path: Path) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget("w1", {"size": 3, "replicas": 2})))

    proc = kubectl("apply", "-n", namespace, "-f", str(manifest))

    assert proc.returncode == 0, proc.stderr
    assert "created" in proc.stdout
    stored = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, "w1")
    assert stored["spec"] == {"size": 3, "replicas": 2}


@pytest.mark.parametrize(("spec", "message"), [
    ({"replicas": 1}, "spec.size: Required value"),
    ({"size": 0}, "should be greater than or equal to 1"),
    ({"size": 2, "replicas": 5}, "replicas must not exceed size"),
], ids=["required-field", "schema-minimum", "cel-rule"])
def test_server_rejects_invalid_custom_objects(api: client.ApiClient, crd: str, namespace: str,
                                               spec: dict, message: str) -> None:
    with pytest.raises(ApiException) as rejected:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, "v1", namespace, PLURAL, widget("bad", spec))

    assert rejected.value.status == 422
    assert message in json.loads(rejected.value.body)["message"]
    proc = kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(widget("bad", spec)))
    assert proc.returncode != 0
    assert message in proc.stderr


def test_rbac_is_enforced_for_service_accounts(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="least-privilege")))
    as_sa = f"--as=system:serviceaccount:{namespace}:least-privilege"

    assert kubectl("auth", "can-i", "list", "pods", "-n", namespace, as_sa).stdout.strip() == "no"
    assert kubectl("auth", "can-i", "list", "pods", "-n", namespace).stdout.strip() == "yes"

    # A token the apiserver signs for the ServiceAccount authenticates (403, not 401).
    token = core.create_namespaced_service_account_token(
        "least-privilege", namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[]))).status.token
    proc = kubectl("get", "pods", "-n", namespace, f"--token={token}")
    assert proc.returncode != 0
    assert "Forbidden" in proc.stderr
    assert f"system:serviceaccount:{namespace}:least-privilege" in proc.stderr


def test_service_ingress_and_pdb_are_admitted(api: client.ApiClient, namespace: str, k2op: Any) -> None:
    manifests = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
         "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "api"},
         "spec": {"rules": [{"host": "api.k2.example", "http": {"paths": [{
             "path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "api"},
         "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "api"}}}},
    ]

    proc = kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(manifests))

    assert proc.returncode == 0, proc.stderr
    cluster_ip = client.CoreV1Api(api).read_namespaced_service("api", namespace).spec.cluster_ip
    assert cluster_ip.startswith("10.0.0.")
    # The disruption controller has looked at it (no pods match, so none may be disrupted).
    policy = client.PolicyV1Api(api)
    k2op.wait_for(lambda: (policy.read_namespaced_pod_disruption_budget("api", namespace).status
                      .observed_generation == 1), "the disruption controller to process the PDB")
    assert policy.read_namespaced_pod_disruption_budget("api", namespace).status.disruptions_allowed == 0


def test_deployment_gets_a_replicaset(api: client.ApiClient, namespace: str, k2op: Any) -> None:
    labels = {"app": "web"}
    client.AppsV1Api(api).create_namespaced_deployment(namespace, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx")])))))

    def owned_replicasets() -> list:
        return [rs for rs in client.AppsV1Api(api).list_namespaced_replica_set(namespace).items
                if any(o.kind == "Deployment" and o.name == "web"
                       for o in rs.metadata.owner_references or [])]

    k2op.wait_for(owned_replicasets, "the deployment controller to create a ReplicaSet")
    # The ReplicaSet controller goes on to create the Pod (which stays Pending: no nodes).
    k2op.wait_for(lambda: client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="app=web").items,
             "the ReplicaSet controller to create a Pod")


def test_deleting_an_owner_collects_what_it_owns(api: client.ApiClient, namespace: str, k2op: Any) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner")))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(
        name="owned", owner_references=[client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)])))

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def owned_gone() -> bool:
        try:
            core.read_namespaced_config_map("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    k2op.wait_for(owned_gone, "the garbage collector to delete the owned ConfigMap")
