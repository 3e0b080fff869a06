"""The kind suite's cluster: `kind` and the node image built here by k2.stack.kindnode, the images
of k2.stack.images loaded, the engine started by k2.stack.docker when none answers.

Where no engine answers and K2 cannot start one (not root), or with K2_KIND_TESTS=0, the root
conftest skips every `kind` test at collection, with the reason, before any of this runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from k2.stack import docker, images, kindcluster, kindnode, kube
from k2.stack.base import free_port

CLUSTER = "k2-test"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> Iterator[Any]:
    """The one cluster of the kind suite (creating one takes minutes): kind-config.yaml on the node
    image built here, named k2-test with free host ports (a `make kind-up` cluster can stay up
    alongside), every image of k2.stack.images loaded; `.http_port` is the host port of the
    Ingress controller's port 80. Deleted at the end of the session."""
    http_port = free_port()
    everything = [image.name for image in images.all_images()]
    with _kind_cluster(CLUSTER, tmp_path_factory.mktemp("kind") / "kubeconfig", load=everything,
                       http_port=http_port) as kind:
        kind.http_port = http_port
        yield kind


@contextlib.contextmanager
def _kind_cluster(name: str, kubeconfig: Path, *, load: Sequence[str] = (),
                  http_port: int | None = None) -> Iterator[Any]:
    """A cluster of kind-config.yaml named `name` (host ports 80/443 moved to free ones, 80 to
    `http_port` if given) with the images of k2.stack.images named in `load`, as pytest-kind's
    KindCluster; deleted afterwards (the session's `docker_engine` stops the engine it started)."""
    from pytest_kind import KindCluster

    docker.ensure_engine()
    try:
        kindcluster.up(name, host_ports={80: http_port or free_port(), 443: free_port()}, kubeconfig=kubeconfig)
        chosen = images.select(load) if load else []
        for image in chosen:
            images.ensure(image)
        kindcluster.load_images(name, [image.tag for image in chosen])
        kind = KindCluster(name, kubeconfig=kubeconfig, kind_path=kindnode.kind_binary(),
                           kubectl_path=kube.kube_bin_dir() / "kubectl")
        kind.create()
        yield kind
    finally:
        if docker.engine_answers():
            kindcluster.delete(name)
