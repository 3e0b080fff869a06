"""The chart's and the kustomize base's RBAC grant exactly what `k2_operator.rbac` declares.

Compared as (apiGroup, resource, verb) triples per scope: nothing missing (reconciliation would
fail with Forbidden) and nothing extra (least privilege). One deliberate split: `get secrets` is
never cluster-wide, it is granted by a Role per namespace, so a cluster-wide operator still reads
Secrets only where K2 resources live (the release namespace, watchNamespaces, rbac.secretNamespaces).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.stack import helm
from k2_operator import rbac

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
Triple = tuple[str, str, str]
SECRETS: set[Triple] = {("", "secrets", "get")}
LEASES: set[Triple] = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def triples(rules: Any) -> set[Triple]:
    out: set[Triple] = set()
    for rule in rules:
        manifest = rule.manifest() if isinstance(rule, rbac.Rule) else rule
        assert not manifest.get("resourceNames") and not manifest.get("nonResourceURLs"), manifest
        for group in manifest["apiGroups"]:
            for resource in manifest["resources"]:
                for verb in manifest["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {manifest}"
                    out.add((group, resource, verb))
    return out


def grants(objects: list[dict[str, Any]], service_account: str,
           namespace: str) -> tuple[set[Triple], dict[str, set[Triple]]]:
    """(cluster-wide triples, namespace → triples) bound to the ServiceAccount."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules", [])
             for o in objects if o["kind"] in ("ClusterRole", "Role")}
    cluster: set[Triple] = set()
    per_namespace: dict[str, set[Triple]] = {}
    for binding in (o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if {"kind": "ServiceAccount", "name": service_account, "namespace": namespace} not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        rules = triples(roles[(ref["kind"], scope, ref["name"])])
        if binding["kind"] == "ClusterRoleBinding":
            cluster |= rules
        else:
            per_namespace.setdefault(binding["metadata"]["namespace"], set()).update(rules)
    return cluster, per_namespace


def test_the_declared_rules_keep_secrets_read_only() -> None:
    assert {t for t in triples(rbac.RULES) if t[1] == "secrets"} == SECRETS
    assert triples(rbac.LEASE_RULES) == LEASES


def test_cluster_scope_grants_the_declared_rules_with_secrets_per_namespace() -> None:
    objects = helm.template(CHART, namespace="k2-system", set_values={"rbac.secretNamespaces[0]": "market-data"})

    cluster, per_namespace = grants(objects, "k2", "k2-system")

    assert cluster == triples(rbac.RULES) - SECRETS
    assert per_namespace == {"k2-system": SECRETS | LEASES, "market-data": SECRETS}


def test_namespace_scope_grants_cluster_rules_cluster_wide_and_the_rest_per_watched_namespace() -> None:
    objects = helm.template(CHART, namespace="k2-system", set_values={
        "rbac.scope": "namespace", "operator.watchNamespaces[0]": "desk-a", "operator.watchNamespaces[1]": "desk-b"})

    cluster, per_namespace = grants(objects, "k2", "k2-system")

    assert cluster == triples(rbac.CLUSTER_RULES)
    assert per_namespace == {"desk-a": triples(rbac.NAMESPACED_RULES), "desk-b": triples(rbac.NAMESPACED_RULES),
                             "k2-system": LEASES}


def test_chart_roles_match_the_rbac_module_helpers() -> None:
    """The module's own manifests (cluster_role/role) and the chart agree in namespace scope."""
    objects = helm.template(CHART, set_values={"rbac.scope": "namespace"})
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    role = next(o for o in objects if o["kind"] == "Role" and not o["metadata"]["name"].endswith("-leader-election"))

    assert triples(cluster_role["rules"]) == triples(rbac.cluster_role(namespaced=True)["rules"])
    assert triples(role["rules"]) == triples(rbac.role("k2")["rules"])


def test_no_rbac_objects_when_disabled() -> None:
    objects = helm.template(CHART, set_values={"rbac.create": "false"})

    assert not {o["kind"] for o in objects} & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@functools.cache
def kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("path", ["manifests/base", "manifests/overlays/dev", "manifests/overlays/kind"])
def test_kustomize_rbac_grants_the_declared_rules(path: str) -> None:
    objects = kustomize(REPO / path)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")

    cluster, per_namespace = grants(objects, account["metadata"]["name"], account["metadata"]["namespace"])

    assert cluster == triples(rbac.RULES) - SECRETS
    assert per_namespace == {account["metadata"]["namespace"]: SECRETS | LEASES}
