"""`helm`, obtained the way the rest of the stack obtains its programs: built from the Go module
proxy into the project cache, once per version, so the chart tests need no package manager and no
download site other than the module proxy.

`helm_binary()` returns `cache_dir()/helm-<version>/bin/helm`, running
`go install helm.sh/helm/v3/cmd/helm@<version>` only when that file is absent. A file lock keeps
two test sessions from building it twice; the binary appears whole (renamed into place) or not at
all, and the `go install` output is kept in `build.log` beside `bin/`.

`template()` and `lint()` run that helm on a chart for the tests (and anyone scripting the chart):
`template()` returns the rendered objects, parsed. (What K2's kind cluster runs besides K2 is
k2.stack.addons: no chart repository is reachable here.)

    python -m k2.stack.helm                               # print helm's path (build it if needed)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import yaml

from .base import StackError, cache_dir, run_logged

log = structlog.get_logger("k2.stack.helm")

# Helm 3 is what most platform teams run; the chart (apiVersion v2) works with Helm 4 as well.
HELM_MODULE = "helm.sh/helm/v3"
HELM_VERSION = os.environ.get("K2_HELM_VERSION", "v3.22.0")
BUILD_TIMEOUT = 1800.0


def helm_bin_dir(version: str = HELM_VERSION) -> Path:
    return cache_dir() / f"helm-{version.removeprefix('v')}" / "bin"


def _go() -> str:
    go = shutil.which("go", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin")
    if not go:
        raise StackError("`go` is not on PATH: install Go >= 1.26 (K2 builds helm from the Go module proxy)")
    return go


def _ldflags(go: str, version: str, env: dict[str, str]) -> str:
    """Upstream's release ldflags: the version, and the Kubernetes version `helm template` and
    `helm lint` assume (derived from the client-go the release builds against, as its Makefile
    does), without which helm would claim Kubernetes v1.20 and refuse `kubeVersion` constraints."""
    proc = subprocess.run([go, "mod", "download", "-json", f"{HELM_MODULE}@{version}"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise StackError(f"go mod download {HELM_MODULE}@{version} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    go_mod = Path(json.loads(proc.stdout)["GoMod"]).read_text()
    match = re.search(r"^\s*k8s\.io/client-go\s+v(\d+)\.(\d+)\.", go_mod, re.MULTILINE)
    if not match:
        raise StackError(f"{HELM_MODULE}@{version} does not require k8s.io/client-go")
    major, minor = int(match.group(1)) + 1, match.group(2)  # client-go v0.N ↔ Kubernetes v1.N
    flags = ["-s", "-w", f"-X {HELM_MODULE}/internal/version.version={version}"]
    for package in ("pkg/lint/rules", "pkg/chartutil"):
        flags += [f"-X {HELM_MODULE}/{package}.k8sVersionMajor={major}",
                  f"-X {HELM_MODULE}/{package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def helm_binary(version: str = HELM_VERSION) -> Path:
    """The path of a working `helm` of `version`, built with `go install` if it is not cached yet."""
    bin_dir = helm_bin_dir(version)
    binary = bin_dir / "helm"
    if binary.exists():
        return binary
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_dir.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # another session built it while we waited for the lock
            return binary
        go = _go()
        build_log = bin_dir.parent / "build.log"
        with tempfile.TemporaryDirectory(dir=bin_dir.parent) as out:
            env = {
                **os.environ,
                "CGO_ENABLED": "0",
                "GOBIN": out,
                "GOFLAGS": f"{os.environ.get('GOFLAGS', '')} -trimpath".strip(),
                "GOPATH": os.environ.get("GOPATH", str(Path.home() / "go")),
            }
            cmd = [go, "install", f"-ldflags={_ldflags(go, version, env)}", f"{HELM_MODULE}/cmd/helm@{version}"]
            log.info("helm.build", version=version, log=str(build_log))
            started = time.monotonic()
            run_logged(cmd, cwd=out, env=env, log_path=build_log, what=f"go install helm {version}",
                       timeout=BUILD_TIMEOUT)
            bin_dir.mkdir(exist_ok=True)
            os.replace(Path(out) / "helm", binary)
        log.info("helm.built", version=version, seconds=round(time.monotonic() - started), path=str(binary))
    return binary


def run_helm(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`helm ARGS…` with a private, empty helm home (no repositories, plugins or kubeconfig leak in)."""
    home = cache_dir() / "helm-home"
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_DATA_HOME": str(home / "data")}
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=timeout, env=env)


def template(chart: Path, *, release: str = "k2", namespace: str = "k2", values: Sequence[Path] = (),
             set_values: Mapping[str, str] | None = None, kube_version: str | None = None) -> list[dict[str, Any]]:
    """`helm template` of `chart`, parsed into objects (hooks included); raises with helm's message."""
    args = ["template", release, str(chart), "--namespace", namespace]
    for path in values:
        args += ["--values", str(path)]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    if kube_version:
        args += ["--kube-version", kube_version]
    proc = run_helm(*args)
    if proc.returncode != 0:
        raise StackError(f"helm template failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def lint(chart: Path, *, values: Sequence[Path] = (), strict: bool = True) -> subprocess.CompletedProcess:
    args = ["lint", str(chart), *(["--strict"] if strict else [])]
    for path in values:
        args += ["--values", str(path)]
    return run_helm(*args)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m k2.stack.helm", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(helm_binary())

if __name__ == "__main__":
    main()
