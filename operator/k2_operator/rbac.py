"""The exact permissions the operator uses, declared once.

The chart and the kustomize base render their (Cluster)Roles from — or are tested against — these
rules, and a unit test checks them against what the code calls (`kube.CHILD_KINDS`, the custom
resources, kopf's own needs), so a new API call without a rule fails in CI, not in a cluster.

`NAMESPACED_RULES` can be granted per namespace (a Role) when the operator watches a list of
namespaces; `CLUSTER_RULES` always need a ClusterRole (kopf discovers resources and namespaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2_operator.models import GROUP, KINDS

READ = ("get", "list", "watch")
MANAGE = ("get", "list", "watch", "create", "patch", "delete")


@dataclass(frozen=True)
class Rule:
    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def manifest(self) -> dict[str, Any]:
        return {"apiGroups": list(self.api_groups), "resources": list(self.resources), "verbs": list(self.verbs)}


_PLURALS = tuple(info.plural for info in KINDS)

NAMESPACED_RULES: tuple[Rule, ...] = (
    Rule((GROUP,), _PLURALS, ("get", "list", "watch", "patch"),
         "watch the custom resources; kopf patches finalizers and its progress annotations"),
    Rule((GROUP,), tuple(f"{p}/status" for p in _PLURALS), ("get", "patch"), "write status"),
    Rule((GROUP,), tuple(f"{p}/finalizers" for p in _PLURALS), ("update",),
         "set ownerReferences with blockOwnerDeletion on children"),
    Rule(("",), ("configmaps", "services"), MANAGE, "settings ConfigMaps and Services (server-side apply, prune)"),
    Rule(("",), ("secrets",), ("get",), "read catalog, registry and API key Secrets named by the resources"),
    Rule(("",), ("events",), ("create", "patch"), "post Events on the resources"),
    Rule(("apps",), ("deployments",), MANAGE, "consumer and query Deployments"),
    Rule(("batch",), ("jobs",), MANAGE, "ingest Jobs (watched: IngestComplete follows them)"),
    Rule(("batch",), ("cronjobs",), MANAGE, "maintenance CronJobs"),
    Rule(("policy",), ("poddisruptionbudgets",), MANAGE, "PodDisruptionBudgets"),
    Rule(("networking.k8s.io",), ("ingresses",), MANAGE, "the QueryService Ingress"),
    Rule(("monitoring.coreos.com",), ("servicemonitors",), ("get", "list", "create", "patch", "delete"),
         "ServiceMonitors, when the Prometheus Operator CRDs exist"),
)

CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(("apiextensions.k8s.io",), ("customresourcedefinitions",), READ,
         "kopf discovers the watched resources; the operator checks for the ServiceMonitor CRD"),
    Rule(("",), ("namespaces",), ("list", "watch"), "kopf follows namespaces in cluster-wide mode"),
)

RULES: tuple[Rule, ...] = NAMESPACED_RULES + CLUSTER_RULES

# Granted only in the operator's own namespace (where its Lease lives), by a Role of its own.
LEASE_RULES: tuple[Rule, ...] = (
    Rule(("coordination.k8s.io",), ("leases",), ("get", "create", "update"),
         "leader election: one active operator replica holds the Lease"),
)


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "k2", "app.kubernetes.io/component": "operator",
            "app.kubernetes.io/part-of": "k2"}


def cluster_role(name: str = "k2-operator", *, namespaced: bool = False) -> dict[str, Any]:
    """All rules in one ClusterRole (cluster-wide mode), or only CLUSTER_RULES when `namespaced`."""
    rules = CLUSTER_RULES if namespaced else RULES
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": _labels()}, "rules": [r.manifest() for r in rules]}


def role(namespace: str, name: str = "k2-operator") -> dict[str, Any]:
    """NAMESPACED_RULES for one watched namespace (namespaced mode)."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels()},
            "rules": [r.manifest() for r in NAMESPACED_RULES]}


def allows(rules: tuple[Rule, ...], api_group: str, resource: str, verb: str) -> bool:
    return any(api_group in r.api_groups and resource in r.resources and verb in r.verbs for r in rules)
