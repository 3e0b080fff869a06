"""The declared RBAC covers every API call the operator makes — and nothing broader."""

from __future__ import annotations

import pytest

from k2_operator import rbac
from k2_operator.handlers import children
from k2_operator.kube import CHILD_KINDS
from k2_operator.models import KINDS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", sorted(CHILD_KINDS), ids=str)
def test_children_can_be_applied_listed_and_pruned(kind: str) -> None:
    child = CHILD_KINDS[kind]
    for verb in ("get", "list", "create", "patch", "delete"):  # server-side apply = create + patch
        assert rbac.allows(rbac.NAMESPACED_RULES, child.group, child.plural, verb), (kind, verb)


@pytest.mark.parametrize("kind", children.WATCHED)
def test_watched_children_can_be_watched(kind: str) -> None:
    child = CHILD_KINDS[kind]
    assert rbac.allows(rbac.NAMESPACED_RULES, child.group, child.plural, "watch")


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_custom_resources(info) -> None:
    for verb in ("get", "list", "watch", "patch"):
        assert rbac.allows(rbac.RULES, "k2.io", info.plural, verb)
    assert rbac.allows(rbac.RULES, "k2.io", f"{info.plural}/status", "patch")
    assert rbac.allows(rbac.RULES, "k2.io", f"{info.plural}/finalizers", "update")
    assert not rbac.allows(rbac.RULES, "k2.io", info.plural, "delete")


def test_least_privilege() -> None:
    assert not rbac.allows(rbac.RULES, "", "secrets", "list")
    assert not rbac.allows(rbac.RULES, "", "secrets", "watch")
    assert not any("*" in r.verbs or "*" in r.resources or "*" in r.api_groups for r in rbac.RULES)
    assert all(r.why for r in rbac.RULES)


def test_manifests() -> None:
    cluster = rbac.cluster_role()
    assert cluster["kind"] == "ClusterRole" and len(cluster["rules"]) == len(rbac.RULES)
    assert len(rbac.cluster_role(namespaced=True)["rules"]) == len(rbac.CLUSTER_RULES)
    role = rbac.role("k2")
    assert role["metadata"]["namespace"] == "k2" and len(role["rules"]) == len(rbac.NAMESPACED_RULES)
