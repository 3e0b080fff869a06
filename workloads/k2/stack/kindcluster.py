"""A kind cluster of kind-config.yaml on the node image built here, for `make kind-up`/`kind-down`
and tests/kind.

`up(name)` starts the Docker engine if none answers (k2.stack.docker), builds the node image if
the engine lacks it (k2.stack.kindnode), and creates the cluster unless it exists. `down(name)`
deletes the cluster and stops the engine if K2 started it and no other kind cluster remains.

    python -m k2.stack.kindcluster up [--name k2]     # prints the kubeconfig context
    python -m k2.stack.kindcluster load [--name k2] IMAGE...
    python -m k2.stack.kindcluster down [--name k2]
    python -m k2.stack.kindcluster cleanup-tests [--stop-engine]   # what scripts/test.sh runs last
    python -m k2.stack.kindcluster prebuild      # what scripts/test.sh runs beside the other tests
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
import yaml

from . import docker, kindnode
from .base import StackError, run

log = structlog.get_logger("k2.stack.kindcluster")

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "kind-config.yaml"
CREATE_TIMEOUT = 1200.0


def render_config(name: str, *, host_ports: Mapping[int, int] | None = None, base: Path = CONFIG) -> dict:
    """kind-config.yaml for cluster `name`: relative extraMounts resolved against the repository
    (kind would resolve them against its working directory), host ports remapped by
    {containerPort: hostPort}, mounts whose host folder is absent dropped (Docker would create an
    empty one)."""
    config = yaml.safe_load(base.read_text())
    config["name"] = name
    for node in config["nodes"]:
        mounts = []
        for mount in node.get("extraMounts", []):
            host = (REPO / mount["hostPath"]).resolve()
            if host.is_dir():
                mounts.append({**mount, "hostPath": str(host)})
            else:
                log.warning("kindcluster.mount_skipped", host_path=str(host), reason="absent")
        node["extraMounts"] = mounts
        for mapping in node.get("extraPortMappings", []):
            mapping["hostPort"] = (host_ports or {}).get(mapping["containerPort"], mapping["hostPort"])
    return config


def clusters() -> list[str]:
    proc = run([str(kindnode.kind_binary()), "get", "clusters"], what="kind get clusters", timeout=120)
    return proc.stdout.split()


def up(name: str = "k2", *, host_ports: Mapping[int, int] | None = None, kubeconfig: Path | None = None) -> str:
    """Create cluster `name` (engine and node image first, as needed); returns its kubectl context
    (in `kubeconfig`, default kind's: $KUBECONFIG or ~/.kube/config)."""
    docker.ensure_engine()
    kindnode.node_image()
    if name not in clusters():
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
            yaml.safe_dump(render_config(name, host_ports=host_ports), config)
            config.flush()
            log.info("kindcluster.create", name=name)
            cmd = [str(kindnode.kind_binary()), "create", "cluster", "--name", name, "--config", config.name,
                   "--wait", "600s", "--retain", *(["--kubeconfig", str(kubeconfig)] if kubeconfig else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CREATE_TIMEOUT)
            if proc.returncode != 0:
                detail = _node_diagnostics(name)
                delete(name)
                raise StackError(f"kind create cluster {name} failed:\n{proc.stderr[-4000:]}\n{detail}")
    return f"kind-{name}"


def _node_diagnostics(name: str) -> str:
    """The kubelet/containerd journal tails of the control-plane node: why a create failed."""
    node = f"{name}-control-plane"
    proc = subprocess.run(["docker", "exec", node, "bash", "-c",
                           "systemctl --failed --no-pager; "
                           "journalctl -u kubelet -u containerd --no-pager | tail -60"],
                          capture_output=True, text=True, timeout=120)
    return f"{node}:\n{proc.stdout[-6000:]}{proc.stderr[-1000:]}"


def load_images(name: str, images: Sequence[str]) -> None:
    """Put images of the engine into every node (`kind load docker-image`)."""
    if images:
        run([str(kindnode.kind_binary()), "load", "docker-image", "--name", name, *images],
            what=f"kind load docker-image {' '.join(images)}", timeout=1800)


def delete(name: str = "k2") -> None:
    run([str(kindnode.kind_binary()), "delete", "cluster", "--name", name], what=f"kind delete cluster {name}",
        timeout=600)


def down(name: str = "k2") -> None:
    """Delete the cluster; stop the engine if K2 started it and no kind cluster is left on it."""
    if docker.engine_answers():
        delete(name)
        if clusters():
            log.info("kindcluster.engine_kept", reason="other kind clusters remain", clusters=clusters())
            return
    docker.stop_engine()


def cleanup_tests(*, stop_engine: bool) -> None:
    """After a test run: delete the clusters the kind tests create (named *-test), and stop the
    engine if the run started it. A no-op where no engine answers."""
    if docker.engine_answers() and kindnode.kind_if_present():
        for name in clusters():
            if name.endswith("-test"):
                delete(name)
    if stop_engine:
        docker.stop_engine()


def prebuild() -> None:
    """Compile helm and every Go program of the kind cluster and of its images unless cached: on
    a fresh machine most of an hour on two cores, which `make test` runs at low priority beside the
    tests that need none of them instead of before the ones that do (they wait on the same build
    locks). Needs no Docker engine, so the engine's own tests may start and stop it meanwhile."""
    from . import helm, images

    started = time.monotonic()
    helm.helm_binary()  # first: the chart tests among the unit tests need it
    kindnode.programs()
    for program in images.GO_PROGRAMS:
        program.install()
    log.info("kindcluster.prebuilt", seconds=round(time.monotonic() - started))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m k2.stack.kindcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "load", "cleanup-tests", "prebuild"])
    parser.add_argument("--stop-engine", action="store_true", help="for cleanup-tests: also stop K2's engine")
    parser.add_argument("--name", default="k2")
    parser.add_argument("images", nargs="*", help="for load: images of the engine to put into the nodes")
    return parser.parse_intermixed_args(argv)  # `load --name k2 IMAGE…`, as the Makefile calls it


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.action == "up":
        print(up(args.name))
    elif args.action == "cleanup-tests":
        cleanup_tests(stop_engine=args.stop_engine)
    elif args.action == "prebuild":
        prebuild()
    elif args.action == "load":
        load_images(args.name, args.images)
    else:
        down(args.name)


if __name__ == "__main__":
    main()
