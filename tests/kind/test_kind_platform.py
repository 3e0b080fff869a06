"""The kind cluster itself, on the node image built here (k2.stack.kindnode): both nodes Ready,
CoreDNS answering, pods on different nodes reaching each other through the default CNI, a PVC
bound and written by the default StorageClass, and the ASX sample mounted read-only in the nodes.

The cluster is the kind suite's own (tests/kind/conftest.py), deleted at the end of the session
(the engine too, when the session started it)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from k2.stack import kindnode, kube

pytestmark = [pytest.mark.kind, pytest.mark.timeout(3600)]

ASX_IN_NODE = "/data/asx"

def wait_json(cluster: Any, what: str, check: Any, *args: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = json.loads(cluster.kubectl(*args, "-o", "json"))
            if check(found):
                return found
        except Exception:  # noqa: BLE001 - "not yet": the object may not exist yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(3)


def run_pod(cluster: Any, name: str, node: str, command: list[str]) -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "restartPolicy": "Never", "containers": [{
            "name": "main", "image": kindnode.runtime_base(), "command": command}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))


def test_both_nodes_are_ready_with_the_built_node_image(cluster: Any) -> None:
    nodes = wait_json(cluster, "two Ready nodes",
                      lambda n: len(n["items"]) == 2 and all(
                          any(c["type"] == "Ready" and c["status"] == "True" for c in i["status"]["conditions"])
                          for i in n["items"]), "get", "nodes")

    versions = {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes["items"]}
    assert versions == {kube.kubernetes_version()}


def test_coredns_resolves_cluster_names(cluster: Any) -> None:
    wait_json(cluster, "CoreDNS available", lambda d: d["status"].get("availableReplicas", 0) >= 1,
              "-n", "kube-system", "get", "deployment", "coredns")
    run_pod(cluster, "dns-probe", f"{cluster.name}-worker",
            ["busybox", "nslookup", "kubernetes.default.svc.cluster.local"])

    pod = wait_json(cluster, "the DNS probe to finish", lambda p: p["status"]["phase"] in ("Succeeded", "Failed"),
                    "get", "pod", "dns-probe")

    assert pod["status"]["phase"] == "Succeeded", cluster.kubectl("logs", "dns-probe")
    assert "10.96.0.1" in cluster.kubectl("logs", "dns-probe")


def test_pods_on_different_nodes_reach_each_other(cluster: Any) -> None:
    run_pod(cluster, "web", f"{cluster.name}-control-plane",
            ["sh", "-c", "mkdir -p /www && echo k2-cross-node > /www/index.html && busybox httpd -f -p 8080 -h /www"])
    server = wait_json(cluster, "the web pod's IP", lambda p: p["status"].get("podIP") and
                       p["status"]["phase"] == "Running", "get", "pod", "web")
    cluster.kubectl("expose", "pod", "web", "--port", "80", "--target-port", "8080")
    ip = server["status"]["podIP"]
    # The client starts once the Service has its endpoint, so that its tries time the data path
    # (kube-proxy's rules, CoreDNS) and not the controller-manager writing the EndpointSlice.
    wait_json(cluster, "the web Service's endpoint", lambda s: any(
        ip in e["addresses"] for i in s["items"] for e in i.get("endpoints") or []),
        "get", "endpointslices", "-l", "kubernetes.io/service-name=web")
    run_pod(cluster, "client", f"{cluster.name}-worker", ["bash", "-c", f"{FETCH.format(ip, 8080)}; "
                                                                       f"{FETCH.format('web.default', 80)}"])

    pod = wait_json(cluster, "the client to finish", lambda p: p["status"]["phase"] in ("Succeeded", "Failed"),
                    "get", "pod", "client", timeout=600)
    log = cluster.kubectl("logs", "client")
    fetched = [line.split(" ", 2)[2] for line in log.splitlines() if line.startswith("fetched ")]

    assert pod["status"]["phase"] == "Succeeded", log
    assert fetched == ["k2-cross-node", "k2-cross-node"], f"{log}\n{network_diagnostics(cluster, 'web')}"


# Fetches http://{0}:{1}/ with bash's /dev/tcp (busybox's wget crashes on a refused connection
# instead of exiting non-zero), retried until the page comes back, not merely until a connection
# opens: a Service's name or rules lag its pod, and a connection may open and answer nothing. Each
# failed try logs what the name resolved to and what the connection said; the last line is
# "fetched {0} <body>".
FETCH = ('for i in $(seq 120); do body=$( (exec 3<>/dev/tcp/{0}/{1} && '
         'printf "GET / HTTP/1.0\\r\\n\\r\\n" >&3 && tail -n 1 <&3) 2>&1); '
         '[ "$body" = k2-cross-node ] && break; '
         'echo "try $i $(date +%T) {0}: resolved [$(getent hosts {0})] answered [$body]"; sleep 1; done; '
         'echo "fetched {0} $body"')


def network_diagnostics(cluster: Any, service: str) -> str:
    """What a failed connection to `service` is checked against: its EndpointSlices, the
    kube-system pods (CoreDNS, kube-proxy, the CNI agent) and the recent kube-proxy and CoreDNS
    logs."""
    checks = [("get", "endpointslices", "-l", f"kubernetes.io/service-name={service}", "-o", "wide"),
              ("-n", "kube-system", "get", "pods", "-o", "wide"),
              ("-n", "kube-system", "logs", "-l", "k8s-app=kube-proxy", "--tail", "30", "--prefix"),
              ("-n", "kube-system", "logs", "-l", "k8s-app=kube-dns", "--tail", "30", "--prefix")]
    shown = []
    for args in checks:
        try:
            shown.append(f"$ kubectl {' '.join(args)}\n{cluster.kubectl(*args)}")
        except Exception as error:  # noqa: BLE001 - a diagnostic must not hide the failure it explains
            shown.append(f"$ kubectl {' '.join(args)}\n{error}")
    return "\n".join(shown)


def test_default_storage_class_binds_and_mounts_a_pvc(cluster: Any) -> None:
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer"},
           "spec": {"restartPolicy": "Never",
                    "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
                    "containers": [{"name": "main", "image": kindnode.runtime_base(),
                                    "command": ["sh", "-c", "echo stored > /d/f && cat /d/f"],
                                    "volumeMounts": [{"name": "d", "mountPath": "/d"}]}]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pvc, pod]}))

    done = wait_json(cluster, "the writer pod", lambda p: p["status"]["phase"] in ("Succeeded", "Failed"),
                     "get", "pod", "writer", timeout=600)
    claim = json.loads(cluster.kubectl("get", "pvc", "data", "-o", "json"))

    assert done["status"]["phase"] == "Succeeded", cluster.kubectl("logs", "writer")
    assert claim["status"]["phase"] == "Bound"
    assert cluster.kubectl("logs", "writer").strip() == "stored"


def test_asx_sample_is_mounted_read_only_in_the_nodes(cluster: Any, asx_root: Path) -> None:
    expected = sorted(p.name for p in asx_root.iterdir())
    for node in (f"{cluster.name}-control-plane", f"{cluster.name}-worker"):
        listed = docker_exec(node, "ls", ASX_IN_NODE).split()
        refused = docker_exec(node, "sh", "-c", f"touch {ASX_IN_NODE}/k2-probe 2>&1 || echo refused")

        assert listed == expected
        assert "refused" in refused


def docker_exec(node: str, *args: str) -> str:
    return subprocess.run(["docker", "exec", node, *args], capture_output=True, text=True, timeout=60).stdout
