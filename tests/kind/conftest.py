"""What the kind tests need besides a Docker engine: `kind` (from PATH, else built from the Go
module proxy into the project cache, like helm) and the K2 image built from this checkout.

Without a Docker engine the root conftest skips every `kind` test at collection, with the reason,
before any of this runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from k2.stack.base import StackError, cache_dir

KIND_VERSION = os.environ.get("K2_KIND_VERSION", "v0.30.0")  # the release whose default node is v1.34.0


@pytest.fixture(scope="session")
def kind_binary() -> Path:
    found = shutil.which("kind")
    if found:
        return Path(found)
    binary = cache_dir() / f"kind-{KIND_VERSION.removeprefix('v')}" / "bin" / "kind"
    if not binary.exists():
        go = shutil.which("go", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin")
        if not go:
            raise StackError("neither `kind` nor `go` is on PATH: install kind >= 0.30 or Go")
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([go, "install", f"sigs.k8s.io/kind@{KIND_VERSION}"], check=True, timeout=1800,
                       env={**os.environ, "GOBIN": str(binary.parent), "CGO_ENABLED": "0"})
    return binary


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
