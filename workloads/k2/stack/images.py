"""Every container image K2's chart and its kind add-ons run, built on this machine.

No image registry is reachable here, so each image is made from what the local stack already
fetches (Debian packages, Maven Central jars, PyPI wheels, Go modules) on a Debian base that
`k2.stack.docker.debian_image` builds with mmdebstrap:

- `k2:dev`: the project's own Dockerfile (`--target runtime`) with PYTHON_IMAGE set to a Debian
  bookworm Python 3.11 base built here (python3, venv, tini, and this machine's CA certificates so
  pip in the build trusts what the host trusts);
- Kafka (k2.stack.kafka's jars in /opt/kafka/libs, Java 17), Apicurio Registry (k2.stack.registry's
  Quarkus app in /deployments, Java 21 from trixie), PostgreSQL 17 (trixie) and versitygw
  (k2.stack.s3's binary): the paths the chart's explicit commands use, which are those of the
  upstream images too;
- the kind add-ons, each built from its Go module at a pinned release: Traefik, the Prometheus
  Operator and its config reloader, Prometheus, metrics-server.

Every image runs as a non-root UID. An image is keyed by what goes into it (its Dockerfile, base,
artifacts' versions; for `k2:dev` the build context's files): `ensure()` returns at once when the
engine holds the tag with that key, else `docker load`s `cache_dir()/images/<name>-<key>.tar`,
else builds it and `docker save`s it there (older tarballs of the image are removed).

    python -m k2.stack.images build [NAME…]   # build or load; prints tag, how, seconds, size
    python -m k2.stack.images list [NAME…]    # the tags, one a line (for `kind load docker-image`)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .base import StackError, cache_dir, run, run_logged
from .docker import debian_image, ensure_engine

log = structlog.get_logger("k2.stack.images")

REPO = Path(__file__).resolve().parents[3]
BUILD_TIMEOUT = 3600.0
LABEL = "k2.image.key"
# The host's CA bundle (with any CA of its own: a TLS-inspecting proxy's, a company's) is what pip
# in the Python base trusts, so pip inside `docker build` reaches PyPI as the host does. (A path
# of its own: a file appended to the rootfs must not repeat a path the packages wrote.)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_CA_BUNDLE = "/etc/ssl/k2-host-ca-certificates.crt"
PIP_CONF = f"[global]\ncert = {BASE_CA_BUNDLE}\n"


# --- bases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Base:
    """A Debian root filesystem imported as an image (k2.stack.docker.debian_image)."""

    tag: str
    packages: tuple[str, ...]
    suite: str = "bookworm"
    hooks: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    with_host_cas: bool = False

    def files(self) -> dict[str, bytes | str]:
        if not self.with_host_cas or not HOST_CA_BUNDLE.exists():
            return {}
        return {BASE_CA_BUNDLE: HOST_CA_BUNDLE.read_bytes(), "/etc/pip.conf": PIP_CONF}

    def ensure(self) -> str:
        return debian_image(self.tag, self.packages, suite=self.suite, files=self.files(), hooks=self.hooks,
                            changes=self.changes)

    def key(self) -> str:
        return _digest(self.tag, self.suite, self.packages, self.hooks, self.changes, self.files())


PYTHON_BASE = Base("k2.local/python:3.11-bookworm",
                   ("python3", "python3-venv", "python-is-python3", "tini", "passwd", "ca-certificates"),
                   with_host_cas=True)
JRE17 = Base("k2.local/jre:17-bookworm", ("openjdk-17-jre-headless", "passwd"))
JRE21 = Base("k2.local/jre:21-trixie", ("openjdk-21-jre-headless", "passwd"), suite="trixie")
# The package's postinst creates a `main` cluster nobody uses: the chart runs initdb itself.
POSTGRES_BASE = Base("k2.local/postgresql-base:17-trixie", ("postgresql-17", "passwd"), suite="trixie",
                     hooks=('rm -rf "$1"/var/lib/postgresql/17 "$1"/etc/postgresql/17',))
# Static Go programs need little more than CA certificates.
STATIC_BASE = Base("k2.local/base:bookworm", ("ca-certificates",))


# --- images --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """One image: its tag, its base, a Dockerfile and what `stage(context)` puts beside it."""

    name: str
    tag: str
    base: Base
    dockerfile: str = ""
    stage: Callable[[Path], None] = lambda context: None
    # What the staged artifacts are (versions), for the key; the staging itself is not hashed.
    inputs: tuple[str | tuple[str, ...], ...] = ()
    build_args: tuple[tuple[str, str], ...] = field(default=())

    def key(self) -> str:
        return _digest(self.tag, self.base.key(), self.dockerfile, self.inputs, self.build_args)

    @property
    def tarball(self) -> Path:
        return cache_dir() / "images" / f"{self.name}-{self.key()}.tar"

    def build(self) -> None:
        base = self.base.ensure()
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f"image-{self.name}.") as tmp:
            context = Path(tmp)
            self.stage(context)
            (context / "Dockerfile").write_text(self.dockerfile)
            docker_build(self, context, {"BASE": base, **dict(self.build_args)})


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def docker_build(image: Image, context: Path, build_args: dict[str, str], extra: Sequence[str] = ()) -> None:
    # --network host: the build's RUN steps (apt, pip) reach the registries exactly as the host
    # does, whatever the engine's bridge and NAT allow (see docs/operations.md).
    cmd = ["docker", "build", "--network", "host", "--tag", image.tag, "--label", f"{LABEL}={image.key()}",
           *(f"--build-arg={k}={v}" for k, v in build_args.items()), *extra, str(context)]
    build_log = cache_dir() / "images" / f"{image.name}.build.log"
    build_log.parent.mkdir(parents=True, exist_ok=True)
    # The legacy builder: Debian's engine has no buildx, and nothing here needs BuildKit.
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run_logged(cmd, cwd=context, env=env, log_path=build_log, what=f"docker build {image.tag}",
               timeout=BUILD_TIMEOUT)


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True)


# K2 ---------------------------------------------------------------------------------------------
K2_CONTEXT = ("pyproject.toml", "README.md", "workloads/k2", "operator/k2_operator", "data/k2_synthetic")


def k2_context_digest() -> str:
    """The files the Dockerfile COPYs (what .dockerignore lets in): a changed source rebuilds."""
    digest = hashlib.sha256((REPO / "Dockerfile").read_bytes())
    for entry in K2_CONTEXT:
        path = REPO / entry
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix not in (".pyc", ".pyo") and not any(part.endswith(".egg-info") for part in p.parts))
        for file in files:
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


class K2Image(Image):
    """The project's Dockerfile on its own context (the repository), not a staged one."""

    def key(self) -> str:
        return _digest(self.tag, self.base.key(), k2_context_digest())

    def build(self) -> None:
        base = self.base.ensure()
        docker_build(self, REPO, {"PYTHON_IMAGE": base}, extra=["--target", "runtime"])


K2 = K2Image("k2", "k2:dev", PYTHON_BASE)


# Infrastructure ---------------------------------------------------------------------------------
def _stage_kafka(context: Path) -> None:
    from .kafka import Kafka

    kafka = Kafka()
    kafka.install()
    _copy_tree(kafka.libs, context / "libs")


def _stage_registry(context: Path) -> None:
    from .registry import SchemaRegistry

    registry = SchemaRegistry()
    registry.install()
    _copy_tree(registry.app_dir, context / "app")


def _stage_versitygw(context: Path) -> None:
    from .s3 import S3

    s3 = S3()
    s3.install()
    (context / "bin").mkdir()
    shutil.copy2(s3.binary, context / "bin" / "versitygw")


def _versions() -> dict[str, str]:
    from .kafka import KAFKA_VERSION
    from .registry import APICURIO_VERSION
    from .s3 import VERSITYGW_VERSION

    return {"kafka": KAFKA_VERSION, "apicurio": APICURIO_VERSION, "versitygw": VERSITYGW_VERSION}


# The users are those of the upstream images (apache/kafka 1000, Apicurio 1001, postgres 999), so
# the chart's runAsUser fits either.
KAFKA_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN groupadd --gid 1000 kafka \\
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kafka \\
 && install -d -o 1000 -g 1000 /var/lib/kafka/data
COPY libs/ /opt/kafka/libs/
USER 1000:1000
EXPOSE 9092 9093
"""
REGISTRY_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN groupadd --gid 1001 registry \\
 && useradd --uid 1001 --gid 1001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin registry
COPY app/ /deployments/
USER 1001:1001
EXPOSE 8080
"""
POSTGRES_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN groupmod --gid 999 postgres && usermod --uid 999 --gid 999 postgres \\
 && install -d -o 999 -g 999 /var/lib/postgresql/data /var/run/postgresql \\
 && chown -R 999:999 /var/lib/postgresql
ENV PATH=/usr/lib/postgresql/17/bin:$PATH PGDATA=/var/lib/postgresql/data
USER 999:999
EXPOSE 5432
"""
VERSITYGW_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
COPY bin/versitygw /usr/local/bin/versitygw
USER 10001:10001
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/versitygw"]
"""


def infra_images() -> list[Image]:
    versions = _versions()
    return [
        Image("kafka", f"k2.local/kafka:{versions['kafka']}", JRE17, KAFKA_DOCKERFILE, _stage_kafka,
              (versions["kafka"],)),
        Image("registry", f"k2.local/apicurio-registry:{versions['apicurio']}", JRE21, REGISTRY_DOCKERFILE,
              _stage_registry, (versions["apicurio"],)),
        Image("postgresql", "k2.local/postgresql:17", POSTGRES_BASE, POSTGRES_DOCKERFILE),
        Image("versitygw", f"k2.local/versitygw:{versions['versitygw']}", STATIC_BASE, VERSITYGW_DOCKERFILE,
              _stage_versitygw, (versions["versitygw"],)),
    ]


# Add-ons: Go programs built from their modules ---------------------------------------------------
@dataclass(frozen=True)
class GoProgram:
    """`packages` of `module`@`version`, built as the main module so its replace directives apply."""

    module: str
    version: str
    packages: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def binaries(self) -> list[str]:
        return [package.rstrip("/").rsplit("/", 1)[-1] for package in self.packages]

    @property
    def bin_dir(self) -> Path:
        name = re.sub(r"/v\d+$", "", self.module).rsplit("/", 1)[-1]  # …/traefik/v3 → traefik
        variant = "".join(f"+{tag}" for tag in self.tags)
        return cache_dir() / f"{name}-{self.version.removeprefix('v')}{variant}" / "bin"

    def install(self) -> Path:
        from .kube import go_build

        if all((self.bin_dir / b).exists() for b in self.binaries):
            return self.bin_dir
        source = module_source(self.module, self.version)
        go_build(source, list(self.packages), self.bin_dir, self.binaries, self.ldflags, self.tags)
        return self.bin_dir


def module_dir(module: str, version: str) -> Path:
    """`module`@`version` in the Go module cache (read-only), downloaded if needed."""
    proc = run(["go", "mod", "download", "-json", f"{module}@{version}"], what=f"go mod download {module}@{version}",
               env=_go_env(), timeout=1800)
    return Path(json.loads(proc.stdout)["Dir"])


def module_source(module: str, version: str) -> Path:
    """A writable copy of `module`@`version` from the module cache, to build inside it: `go
    install pkg@version` refuses modules with replace directives (Traefik's, the operator's).

    The module zip lacks what upstream's own checkout has: nested modules (the operator's
    pkg/client and pkg/apis/monitoring) that go.mod replaces with their folder, and a go.work
    (Prometheus') naming folders that are not there. Those replacements are dropped, so the
    published module of the required version is used, and the workspace file is removed."""
    copy = cache_dir() / "go-src" / f"{module.replace('/', '_')}@{version}"
    if copy.exists():
        return copy
    source = module_dir(module, version)
    copy.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=copy.parent) as tmp:
        staged = Path(tmp) / "src"
        shutil.copytree(source, staged)
        for path in [staged, *staged.rglob("*")]:  # the module cache's files are read-only
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        for name in ("go.work", "go.work.sum"):
            (staged / name).unlink(missing_ok=True)
        go = _go_env()
        mod = json.loads(run(["go", "mod", "edit", "-json"], cwd=staged, env=go, what="go mod edit").stdout)
        missing = [rule["Old"]["Path"] for rule in mod.get("Replace") or []
                   if rule["New"]["Path"].startswith(".") and not (staged / rule["New"]["Path"]).is_dir()]
        if missing:
            run(["go", "mod", "edit", *(f"-dropreplace={path}" for path in missing)], cwd=staged, env=go,
                what="go mod edit")
            # go.sum has no lines for modules that were replaced by a folder: add them.
            versions = {r["Path"]: r["Version"] for r in mod["Require"]}
            run(["go", "get", *(f"{path}@{versions[path]}" for path in missing)], cwd=staged, env=go,
                what=f"go get {' '.join(missing)}", timeout=1800)
        staged.rename(copy)
    return copy


def _go_env() -> dict[str, str]:
    return {"PATH": f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin", "GOWORK": "off"}


PROMETHEUS_VERSION = "v3.16.0"  # the module's v0.316.0
# promtool of the same release and build: it checks and unit-tests the chart's alert rules
# (tests/unit/test_chart_monitoring.py). Only Kubernetes service discovery, the one the Prometheus
# Operator configures: the other clouds' SDKs are half the source to compile.
PROMETHEUS = GoProgram(
    "github.com/prometheus/prometheus", "v0.316.0", ("./cmd/prometheus", "./cmd/promtool"), tuple(
        f"-X github.com/prometheus/common/version.{var}={value}"
        for var, value in (("Version", PROMETHEUS_VERSION.removeprefix("v")), ("Branch", "HEAD"),
                           ("Revision", "v0.316.0"), ("BuildUser", "k2"))),
    ("remove_all_sd", "enable_kubernetes_sd"))
PROMETHEUS_OPERATOR = GoProgram("github.com/prometheus-operator/prometheus-operator", "v0.85.0",
                                ("./cmd/operator", "./cmd/prometheus-config-reloader"), (
    "-X github.com/prometheus/common/version.Version=0.85.0",))
TRAEFIK = GoProgram("github.com/traefik/traefik/v3", "v3.6.12", ("./cmd/traefik",), (
    "-X github.com/traefik/traefik/v3/pkg/version.Version=v3.6.12",))
METRICS_SERVER = GoProgram("sigs.k8s.io/metrics-server", "v0.8.0", ("./cmd/metrics-server",), (
    "-X k8s.io/client-go/pkg/version.gitVersion=v0.8.0",))


# What kindcluster.prebuild compiles ahead; Prometheus first: the unit tests' promtool is in it.
GO_PROGRAMS = (PROMETHEUS, PROMETHEUS_OPERATOR, TRAEFIK, METRICS_SERVER)


def _go_binary_dockerfile(binary: str, *, workdir: str = "/") -> str:
    # /bin/<binary>: where the upstream images keep them (the Prometheus Operator runs the
    # reloader as /bin/prometheus-config-reloader); nobody (65534) as in those images.
    return f"""\
ARG BASE
FROM ${{BASE}}
COPY {binary} /usr/bin/{binary}
RUN install -d -o 65534 -g 65534 {workdir}
WORKDIR {workdir}
USER 65534:65534
ENTRYPOINT ["/bin/{binary}"]
"""


def _go_image(name: str, tag: str, program: GoProgram, binary: str, workdir: str = "/") -> Image:
    def stage(context: Path) -> None:
        shutil.copy2(program.install() / binary, context / binary)

    return Image(name, tag, STATIC_BASE, _go_binary_dockerfile(binary, workdir=workdir), stage,
                 (program.module, program.version, program.ldflags, program.tags))


ADDON_IMAGES = [
    _go_image("traefik", f"k2.local/traefik:{TRAEFIK.version}", TRAEFIK, "traefik"),
    _go_image("prometheus", f"k2.local/prometheus:{PROMETHEUS_VERSION}", PROMETHEUS, "prometheus", "/prometheus"),
    _go_image("prometheus-operator", f"k2.local/prometheus-operator:{PROMETHEUS_OPERATOR.version}",
              PROMETHEUS_OPERATOR, "operator"),
    _go_image("prometheus-config-reloader", f"k2.local/prometheus-config-reloader:{PROMETHEUS_OPERATOR.version}",
              PROMETHEUS_OPERATOR, "prometheus-config-reloader"),
    _go_image("metrics-server", f"k2.local/metrics-server:{METRICS_SERVER.version}", METRICS_SERVER,
              "metrics-server"),
]


def all_images() -> list[Image]:
    return [K2, *infra_images(), *ADDON_IMAGES]


def select(names: Sequence[str] = ()) -> list[Image]:
    images = all_images()
    if not names:
        return images
    by_name = {image.name: image for image in images}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise StackError(f"unknown image(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]


# --- build, load, save ---------------------------------------------------------------------------
def engine_key(tag: str) -> str | None:
    proc = subprocess.run(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', tag],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size(tag: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], what="docker image inspect").stdout)


def ensure(image: Image) -> str:
    """Make the engine hold `image` (its current key); returns how: present, loaded or built."""
    key = image.key()
    if engine_key(image.tag) == key:
        return "present"
    lock_path = cache_dir() / "images" / f".{image.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # Two sessions (a test run and `make kind-up`, say) must not build the same image at once.
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if engine_key(image.tag) == key:
            return "present"
        return _load_or_build(image, key)


def _load_or_build(image: Image, key: str) -> str:
    tarball = image.tarball
    if tarball.exists():
        run(["docker", "load", "--input", str(tarball)], what=f"docker load {tarball.name}", timeout=900)
        if engine_key(image.tag) == key:
            return "loaded"
        log.warning("images.stale_tarball", tarball=str(tarball))
    log.info("images.build", image=image.tag, key=key)
    image.build()
    _prune_superseded()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    run(["docker", "save", "--output", str(partial), image.tag], what=f"docker save {image.tag}", timeout=900)
    os.replace(partial, tarball)
    for old in tarball.parent.glob(f"{image.name}-*.tar"):
        if old != tarball:
            old.unlink()
    return "built"


def _prune_superseded() -> None:
    """Drop the images a rebuild left untagged (the K2 image is rebuilt whenever the checkout
    changes: about 1 GB each, which filled the disk of a kind run here). Only untagged images
    carrying a label K2's builds set are removed; whatever else the engine holds is left alone."""
    for label in (LABEL, "org.opencontainers.image.title=k2"):
        run(["docker", "image", "prune", "--force", "--filter", f"label={label}"],
            what="docker image prune", timeout=300)


def ensure_all(names: Sequence[str] = ()) -> list[dict[str, object]]:
    ensure_engine()
    report = []
    for image in select(names):
        started = time.monotonic()
        how = ensure(image)
        report.append({"image": image.tag, "how": how, "seconds": round(time.monotonic() - started, 1),
                       "size_mb": round(image_size(image.tag) / 1e6)})
        log.info("images.ready", **report[-1])
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m k2.stack.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "list"])
    parser.add_argument("names", nargs="*", help="image names (default: all): " +
                        ", ".join(image.name for image in all_images()))
    args = parser.parse_args(argv)
    if args.action == "list":
        print("\n".join(image.tag for image in select(args.names)))
        return
    for row in ensure_all(args.names):
        print(f"{row['image']:55} {row['how']:8} {row['seconds']:>8}s {row['size_mb']:>6} MB")


if __name__ == "__main__":
    main()
