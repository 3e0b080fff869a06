"""kind-config.yaml and the Tiltfile describe the same cluster and release as the chart:
an ingress-ready control plane with 80/443 on the host plus a worker, at the Kubernetes minor
the local stack tests against; Tilt's resources, images and files exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from k2.stack import addons, helm, kindnode

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
KIND = yaml.safe_load((REPO / "kind-config.yaml").read_text())
TILTFILE = (REPO / "Tiltfile").read_text()


def test_kind_cluster_has_an_ingress_ready_control_plane_and_a_worker() -> None:
    roles = [n["role"] for n in KIND["nodes"]]
    control = KIND["nodes"][0]

    assert KIND["kind"] == "Cluster" and KIND["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert roles == ["control-plane", "worker"]
    patches = [yaml.safe_load(p) for p in control["kubeadmConfigPatches"]]
    assert any(p["nodeRegistration"]["kubeletExtraArgs"]["node-labels"] == "ingress-ready=true" for p in patches)
    assert {(m["containerPort"], m["hostPort"]) for m in control["extraPortMappings"]} == {(80, 80), (443, 443)}


def test_kind_nodes_run_the_node_image_built_for_the_local_apiserver_version() -> None:
    for node in KIND["nodes"]:
        assert node["image"] == kindnode.node_image_tag()
        assert {"hostPath": "../shared/data/asx-2014-03", "containerPath": "/data/asx", "readOnly": True} \
            in node["extraMounts"]


def test_traefik_runs_where_kind_maps_the_host_ports() -> None:
    docs = addons.manifests()
    traefik = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "traefik")
    spec = traefik["spec"]["template"]["spec"]
    ingress_class = next(d for d in docs if d["kind"] == "IngressClass")

    assert spec["nodeSelector"] == {"ingress-ready": "true"}
    assert {p["hostPort"] for p in spec["containers"][0]["ports"] if "hostPort" in p} == \
        {m["hostPort"] for m in KIND["nodes"][0]["extraPortMappings"]}
    kind_values = yaml.safe_load((REPO / "charts/k2/ci/kind-values.yaml").read_text())
    assert kind_values["samples"]["ingress"]["className"] == ingress_class["metadata"]["name"]


def test_tiltfile_is_starlark_that_points_at_real_things() -> None:
    tree = ast.parse(TILTFILE)  # Starlark's syntax is a subset of Python's
    calls = {node.func.id: node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name)}
    build = calls["docker_build"]
    target = next(k.value.value for k in build.keywords if k.arg == "target")

    assert re.search(rf"^FROM \S+ AS {target}$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    for source in re.findall(r"sync\('([^']+)'", TILTFILE):
        assert (REPO / source).is_dir(), source
    assert "allow_k8s_contexts('kind-k2')" in TILTFILE and KIND["name"] == "k2"
    for name in ("port_forwards", "serve_cmd", "live_update", "match_in_env_vars=True"):
        assert name in TILTFILE


def test_tilt_resources_name_objects_the_chart_renders() -> None:
    values = re.search(r"'--values', '([^']+)'", TILTFILE).group(1)
    objects = helm.template(REPO / "charts/k2", release="k2", namespace="k2", values=[REPO / values],
                            set_values={"operator.reloadOnChange": "true"})
    workloads = {o["metadata"]["name"] for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")}
    names = {(o["metadata"]["name"], o["kind"].lower()) for o in objects}
    image = yaml.safe_load((REPO / values).read_text())["image"]["repository"]

    for name in re.findall(r"k8s_resource\('([^']+)'", TILTFILE):
        assert name in workloads, name
    for loop in re.findall(r"for name in \[([^\]]+)\]", TILTFILE):
        for name in re.findall(r"'([^']+)'", loop):
            assert name in workloads, name
    for selector in re.findall(r"'([a-z0-9-]+:[a-z]+)'", TILTFILE):
        assert tuple(selector.split(":")) in names, selector
    assert re.search(rf"docker_build\(\s*'{image}'", TILTFILE), "Tilt must build the image the chart runs"
