"""The RBAC declared in `k2_operator.rbac` is enough: an operator authenticated as a ServiceAccount
bound to exactly those rules (namespaced mode: a Role plus the cluster-scoped rules) reconciles
every sample kind to Ready. The apiserver enforces RBAC for everyone but the admin user."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.config import kube_config

from k2_operator import rbac

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


@pytest.fixture
def service_account_kubeconfig(cluster: Any, namespace: str, tmp_path: Path) -> Path:
    sa = "k2-operator"
    cluster.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name=sa)))
    rbac_api = client.RbacAuthorizationV1Api(cluster.api)
    cluster_role = rbac.cluster_role(f"k2-operator-{namespace}", namespaced=True)
    rbac_api.create_cluster_role(cluster_role)
    rbac_api.create_namespaced_role(namespace, rbac.role(namespace))
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]
    rbac_api.create_cluster_role_binding({"metadata": {"name": cluster_role["metadata"]["name"]}, "subjects": subject,
                                          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                      "name": cluster_role["metadata"]["name"]}})
    rbac_api.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "k2-operator"}, "subjects": subject,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "k2-operator"}})
    token = cluster.core.create_namespaced_service_account_token(sa, namespace, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    admin["users"] = [{"name": sa, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = sa
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    yield path
    rbac_api.delete_cluster_role_binding(cluster_role["metadata"]["name"])
    rbac_api.delete_cluster_role(cluster_role["metadata"]["name"])


def test_operator_runs_with_exactly_the_declared_rules(cluster: Any, namespace: str, service_account_kubeconfig: Path,
                                                       asset_class: str, k2op: Any) -> None:
    assert cluster.kubectl("--kubeconfig", str(service_account_kubeconfig), "get", "secrets", "-n", namespace
                           ).returncode != 0, "the ServiceAccount must not list Secrets"
    admin_kubeconfig = os.environ["KUBECONFIG"]
    os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(service_account_kubeconfig)
    try:
        with KopfRunner(k2op.operator_args(namespace), timeout=60) as runner:
            docs = [d for d in k2op.load_samples(asset_class)
                    if d["metadata"]["name"] in ("synthetic", "synthetic-trades", "synthetic-quotes",
                                                 "synthetic-reference", "k2-api", "market-trades",
                                                 "market-quotes", "market-reference", "fx-fixings")]
            for doc in docs:
                if doc["kind"] == "IcebergTable":
                    doc["spec"]["namespace"] = f"{doc['spec']['namespace']}_{asset_class}"
                    if doc["metadata"]["name"].startswith("market-"):  # no pipeline registers these here
                        doc["spec"]["schema"] = {"fields": [{"name": "symbol", "type": "string"}]}
                        for key in ("partitionBy", "sortBy"):
                            doc["spec"].pop(key, None)
                cluster.create(namespace, doc)
            for doc in docs:
                cluster.wait_condition(namespace, doc["kind"], doc["metadata"]["name"], timeout=60)
            k2op.wait_for(lambda: cluster.events(namespace, "synthetic", "Reconciled"), "Events posted", 10)
            for doc in docs:
                cluster.delete(namespace, doc["kind"], doc["metadata"]["name"])
            for doc in docs:
                cluster.wait_gone(namespace, doc["kind"], doc["metadata"]["name"], timeout=60)
    finally:
        os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = admin_kubeconfig
    assert runner.exception is None
    forbidden = [line for line in runner.output.splitlines()
                 if "forbidden" in line.lower() or re.search(r"[\s(]403[\s)]", line)]  # not a ",403" timestamp
    assert not forbidden, forbidden[:5]
