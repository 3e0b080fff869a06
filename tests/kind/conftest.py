"""What the kind tests need besides a Docker engine: `kind` and the node image (both built here by
k2.stack.kindnode, the engine started by k2.stack.docker when none answers), and the K2 image.

Where no engine answers and K2 cannot start one (not root), or with K2_KIND_TESTS=0, the root
conftest skips every `kind` test at collection, with the reason, before any of this runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from k2.stack import docker, images, kindcluster, kindnode, kube
from k2.stack.base import free_port


@pytest.fixture(scope="session")
def kind_binary() -> Path:
    return kindnode.kind_binary()


@pytest.fixture(scope="session")
def k2_image() -> str:
    """The image under test: K2_KIND_IMAGE if given (already built), else built here."""
    image = os.environ.get("K2_KIND_IMAGE")
    if image:
        return image
    image = "k2:kind-test"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(["docker", "build", "--target", "runtime", "-t", image, str(repo)], check=True, timeout=1800)
    return image


@pytest.fixture(scope="session")
def kind_cluster() -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """`with kind_cluster(name, kubeconfig, load=[image names], http_port=…) as cluster:`."""
    return _kind_cluster


@contextlib.contextmanager
def _kind_cluster(name: str, kubeconfig: Path, *, load: Sequence[str] = (),
                  http_port: int | None = None) -> Iterator[Any]:
    """A cluster of kind-config.yaml named `name` (host ports 80/443 moved to free ones, 80 to
    `http_port` if given) with the images of k2.stack.images named in `load`, as pytest-kind's
    KindCluster; deleted afterwards, and the engine stopped if this started it."""
    from pytest_kind import KindCluster

    engine_was_running = docker.engine_answers()
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
        if not engine_was_running:
            docker.stop_engine()
