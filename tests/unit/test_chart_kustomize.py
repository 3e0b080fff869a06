"""The kustomize base deploys the same operator pod as the Helm chart, and its overlays render,
keep the workloads on the operator's own image, and stay in one namespace."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.stack import helm
from k2_operator.main import REQUIRED_IN_CLUSTER

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["manifests/base", "manifests/overlays/dev", "manifests/overlays/kind"]
# Pod fields that must be identical in both (labels, env and image are set differently on purpose).
SAME_POD_FIELDS = ("securityContext", "automountServiceAccountToken", "enableServiceLinks", "volumes",
                   "terminationGracePeriodSeconds")
SAME_CONTAINER_FIELDS = ("ports", "startupProbe", "livenessProbe", "readinessProbe", "resources", "securityContext",
                         "volumeMounts", "imagePullPolicy")


@functools.cache
def kustomize(target: str) -> list[dict[str, Any]]:
    proc = subprocess.run(["kubectl", "kustomize", str(REPO / target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def operator_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")


def operator_env_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("k2-operator-env"))


def test_base_lists_every_generated_crd() -> None:
    kustomization = yaml.safe_load((REPO / "manifests/base/kustomization.yaml").read_text())
    base = REPO / "manifests/base"
    crds = sorted(p.relative_to(base).as_posix() for p in (base / "crds").glob("*.yaml"))

    assert crds, "manifests/base/crds/ is empty: run `python -m k2_operator.crds --write`"
    assert sorted(r for r in kustomization["resources"] if r.startswith("crds/")) == crds


ENDPOINTS = REQUIRED_IN_CLUSTER


def test_base_and_chart_run_the_same_operator_pod() -> None:
    base = operator_deployment(kustomize("manifests/base"))
    chart = operator_deployment(helm.template(REPO / "charts/k2"))
    base_pod, chart_pod = base["spec"]["template"]["spec"], chart["spec"]["template"]["spec"]

    assert base["spec"]["strategy"] == chart["spec"]["strategy"]
    assert base["spec"]["replicas"] == chart["spec"]["replicas"]
    for name in SAME_POD_FIELDS:
        assert base_pod.get(name) == chart_pod.get(name), name
    base_box, chart_box = base_pod["containers"][0], chart_pod["containers"][0]
    for name in SAME_CONTAINER_FIELDS:
        assert base_box.get(name) == chart_box.get(name), name
    assert base_box["args"] == chart_box["args"] == ["operator"]


def test_base_configures_the_same_variables_as_the_chart() -> None:
    objects = kustomize("manifests/base")
    env_map = operator_env_map(objects)
    chart_env = {e["name"] for e in operator_deployment(helm.template(REPO / "charts/k2"))
                 ["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"].startswith("K2_")}

    assert set(env_map["data"]) <= chart_env
    assert chart_env - set(env_map["data"]) <= {"K2_OPERATOR_DRIFT_INTERVAL", "K2_OPERATOR_RETRY_DELAY",
                                                "K2_OPERATOR_WORKERS", *ENDPOINTS}, \
        "only tunables (and the endpoints each overlay names) may be left out"


def test_the_base_names_no_endpoints_and_every_overlay_does() -> None:
    assert not set(ENDPOINTS) & set(operator_env_map(kustomize("manifests/base"))["data"])
    for target in TARGETS:
        if target != "manifests/base":
            assert set(ENDPOINTS) <= set(operator_env_map(kustomize(target))["data"]), target


@pytest.mark.parametrize("target", TARGETS)
def test_workloads_run_the_operators_image_and_everything_stays_in_one_namespace(target: str) -> None:
    objects = kustomize(target)
    deployment = operator_deployment(objects)
    env_map = operator_env_map(objects)
    namespace = next(o for o in objects if o["kind"] == "Namespace")["metadata"]["name"]

    assert env_map["data"]["K2_OPERATOR_IMAGE"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    for obj in objects:
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == namespace
    labels = next(o for o in objects if o["kind"] == "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
