"""What K2's kind cluster runs besides K2, installed from files this project keeps (no chart
repository is reachable here): Traefik as the Ingress controller, the Prometheus Operator with one
Prometheus that selects every monitor and rule, and metrics-server, from manifests/kind-addons/.

The Prometheus Operator's CRDs come from its Go module source at the version whose images
k2.stack.images builds, so CRDs and operator always match. Every image the manifests name is one
of k2.stack.images' add-on images (`python -m k2.stack.images list …`), loaded into the nodes
beforehand; `images()` lists them for `kind load`.

    python -m k2.stack.addons [--kube-context kind-k2] [--kubeconfig PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog
import yaml

from .base import StackError
from .images import PROMETHEUS_OPERATOR, module_dir

log = structlog.get_logger("k2.stack.addons")

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "kind-addons"
# Workloads to wait for; the Prometheus StatefulSet is created by the operator, so it comes last.
ROLLOUTS = (("traefik", "deployment/traefik"), ("monitoring", "deployment/prometheus-operator"),
            ("kube-system", "deployment/metrics-server"), ("monitoring", "statefulset/prometheus-k2"))


def operator_crds() -> Path:
    return module_dir(PROMETHEUS_OPERATOR.module, PROMETHEUS_OPERATOR.version) / "example" / "prometheus-operator-crd"


def manifests() -> list[dict]:
    return [doc for path in sorted(MANIFESTS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def images() -> list[str]:
    """Every image the add-on manifests run (the config reloader is named in the operator's args)."""
    found = []
    for doc in manifests():
        if doc["kind"] == "Prometheus":
            found.append(doc["spec"]["image"])
        for box in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            found.append(box["image"])
            found += [arg.split("=", 1)[1] for arg in box.get("args", [])
                      if arg.startswith("--prometheus-config-reloader=")]
    return sorted(set(found))


class Kubectl:
    def __init__(self, kubeconfig: Path | None, kube_context: str | None) -> None:
        from .kindnode import kube_binaries

        # The kubectl of the kind node's own build (cached), not whatever is on PATH.
        kubectl = str(kube_binaries() / "kubectl")
        self.base = [kubectl, *([f"--kubeconfig={kubeconfig}"] if kubeconfig else []),
                     *([f"--context={kube_context}"] if kube_context else [])]

    def __call__(self, *args: str, timeout: float = 300, input: str | None = None) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, input=input)
        if proc.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)} failed:\n{proc.stderr.strip()}")
        return proc.stdout


def install(*, kubeconfig: Path | None = None, kube_context: str | None = None, timeout: float = 600) -> None:
    kubectl = Kubectl(kubeconfig, kube_context)
    crds = operator_crds()
    # Server-side: the Prometheus CRD is larger than client-side apply's annotation limit.
    # (-o name: the CRD files hold YAML that PyYAML's safe loader refuses, a `=` value tag.)
    names = kubectl("apply", "--server-side", "--force-conflicts", "-o", "name", "-f", str(crds)).split()
    kubectl("wait", "--for=condition=Established", "--timeout=120s", *names, timeout=180)
    documents = manifests()
    aggregated = [doc for doc in documents if doc["kind"] == "APIService"]
    served = [doc for doc in documents if doc["kind"] != "APIService"]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(served))
    deadline = time.monotonic() + timeout
    for namespace, workload in ROLLOUTS:
        while True:  # the operator creates Prometheus' StatefulSet a moment after the CR appears
            try:
                kubectl("-n", namespace, "get", workload, timeout=30)
                break
            except StackError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        left = max(10, int(deadline - time.monotonic()))
        kubectl("-n", namespace, "rollout", "status", workload, f"--timeout={left}s", timeout=left + 30)
        log.info("addons.ready", namespace=namespace, workload=workload)
    _register_aggregated(kubectl, aggregated, deadline)


def _register_aggregated(kubectl: Kubectl, services: list[dict], deadline: float) -> None:
    """The metrics API is registered only once metrics-server serves behind its Service. Registered
    earlier, the apiserver's first connection to the Service IP can precede kube-proxy's rules for
    it: un-NATed, it leaves through the node's default route, and the apiserver keeps reusing that
    connection (seen on kind here: the host's egress answered 404, so the metrics API never came up)."""
    if not services:
        return
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(services))
    names = [f"apiservice/{doc['metadata']['name']}" for doc in services]
    left = max(10, int(deadline - time.monotonic()))
    kubectl("wait", "--for=condition=Available", f"--timeout={left}s", *names, timeout=left + 30)
    log.info("addons.ready", apiservices=names)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m k2.stack.addons", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kube-context")
    parser.add_argument("--kubeconfig", type=Path)
    parser.add_argument("--images", action="store_true", help="only print the images the add-ons run")
    args = parser.parse_args(argv)
    if args.images:
        print("\n".join(images()))
    else:
        install(kubeconfig=args.kubeconfig, kube_context=args.kube_context)


if __name__ == "__main__":
    main()
