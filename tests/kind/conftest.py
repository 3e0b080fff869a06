"""What the kind tests need besides a Docker engine: `kind` and the node image (both built here by
k2.stack.kindnode, the engine started by k2.stack.docker when none answers), and the K2 image.

Where no engine answers and K2 cannot start one (not root), or with K2_KIND_TESTS=0, the root
conftest skips every `kind` test at collection, with the reason, before any of this runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from k2.stack import kindnode


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
