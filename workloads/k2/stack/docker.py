"""A Docker engine on demand (for kind and the images K2 builds), and Debian base images built here.

`ensure_engine()` returns at once when a Docker engine already answers on the default socket.
Otherwise, as root, it installs Debian's `docker.io` if `dockerd` is absent and starts `dockerd`
with everything in two documented places:

- `cache_dir()/docker/` (`K2_DOCKER_ROOT` to move it): the engine's data-root (images, build cache,
  containers, volumes; it survives `stop_engine()` so images stay cached) and `dockerd.log`;
- `/run/k2-docker/` (a short path: containerd's sockets live there): exec-root, `dockerd.pid`,
  and the OCI runtime wrapper below.

It serves the default socket `/var/run/docker.sock`, so `docker`, `kind` and pytest-kind need no
DOCKER_HOST. `stop_engine()` stops that daemon (and the containerd it started) by the recorded
PID, and only a daemon K2 started: an engine started by someone else is never touched.

Where root's bounding set lacks CAP_SYS_RESOURCE (some sandboxes; see docs/operations.md),
`docker run --privileged` (kind nodes) fails with "unable to apply caps", and runc cannot set a
negative oom_score_adj. Only there, dockerd's default runtime is a small wrapper that removes that
capability from the bundle's config.json (`runc create/run`) or the `--process` file (`runc
exec`, i.e. `docker exec`) and clamps a negative oomScoreAdj to 0, then execs runc unchanged. On an
ordinary host the engine runs plain runc.

`debian_image(tag, packages, ...)` builds a Debian root filesystem with mmdebstrap (cached as a
tarball keyed by suite + packages + extra files under `cache_dir()/rootfs/`) and `docker import`s
it as `tag`, with ENV/ENTRYPOINT/… given as `docker import --change` instructions.

    python -m k2.stack.docker up | down | status
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from .base import Service, StackError, apt_install, cache_dir, run

log = structlog.get_logger("k2.stack.docker")

RUN_DIR = Path("/run/k2-docker")
SOCKET = "/var/run/docker.sock"
WRAPPER_RUNTIME = "k2-runc"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("K2_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CAP_SYS_RESOURCE = 24
ROOTFS_FORMAT = 2  # bump when debian_rootfs() builds differently for the same inputs

# Kept tiny and stdlib-only: runc is called for every container start and every `docker exec`.
RUNC_WRAPPER = r'''#!/usr/bin/python3
# Written by k2.stack.docker: root here lacks CAP_SYS_RESOURCE, so drop it from what runc is asked
# to grant and clamp negative oomScoreAdj, then run runc with the same arguments.
import json, os, sys

def fix(path):
    with open(path) as f:
        spec = json.load(f)
    process = spec.get("process", spec)  # config.json has .process; an exec --process file is one
    for key, caps in (process.get("capabilities") or {}).items():
        process["capabilities"][key] = [c for c in caps if c != "CAP_SYS_RESOURCE"]
    if (process.get("oomScoreAdj") or 0) < 0:
        process["oomScoreAdj"] = 0
    with open(path, "w") as f:
        json.dump(spec, f)

args = sys.argv[1:]
commands = {"create", "run", "exec"}
command = next((a for a in args if a in commands), None)
if command:
    rest = args[args.index(command) + 1:]
    flag = ("--process", "-p") if command == "exec" else ("--bundle", "-b")
    target = None
    for i, arg in enumerate(rest):
        if arg in flag and i + 1 < len(rest):
            target = rest[i + 1]
        elif any(arg.startswith(f + "=") for f in flag):
            target = arg.split("=", 1)[1]
    if command != "exec":
        target = os.path.join(target or os.getcwd(), "config.json")
    if target and os.path.exists(target):
        fix(target)
os.execvp("runc", ["runc", *args])
'''


def lacks_sys_resource() -> bool:
    """True where root's capability bounding set has no CAP_SYS_RESOURCE (this sandbox kind)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not (int(line.split()[1], 16) >> CAP_SYS_RESOURCE) & 1
    return False


def engine_answers() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        return subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def docker_root() -> Path:
    path = Path(os.environ.get("K2_DOCKER_ROOT", cache_dir() / "docker"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class DockerEngine(Service):
    """dockerd as a stack service, its state machine-wide (one engine per host, shared by checkouts)."""

    name: str = "dockerd"
    start_timeout: float = 120.0

    @property
    def home(self) -> Path:
        return docker_root()

    @property
    def log_path(self) -> Path:
        return docker_root() / "dockerd.log"

    @property
    def pid_path(self) -> Path:
        return RUN_DIR / "dockerd.pid"

    def install(self) -> None:
        if os.geteuid() != 0:
            raise StackError("no Docker engine answers and starting one needs root: start Docker yourself "
                             "(or run as root and K2 installs Debian's docker.io and starts dockerd)")
        if shutil.which("dockerd"):
            return
        apt_install("docker.io")
        if not shutil.which("dockerd"):
            raise StackError("apt-get installed docker.io but no `dockerd` is on PATH")

    def prepare(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        if lacks_sys_resource():
            wrapper = RUN_DIR / "runc-wrapper"
            wrapper.write_text(RUNC_WRAPPER)
            wrapper.chmod(0o755)

    def command(self) -> list[str]:
        cmd = [shutil.which("dockerd") or "dockerd", "--data-root", str(docker_root() / "data"),
               "--exec-root", str(RUN_DIR / "exec"), "--pidfile", str(RUN_DIR / "dockerd.docker-pid"),
               "--host", f"unix://{SOCKET}"]
        if lacks_sys_resource():
            cmd += ["--add-runtime", f"{WRAPPER_RUNTIME}={RUN_DIR / 'runc-wrapper'}",
                    "--default-runtime", WRAPPER_RUNTIME]
        return cmd

    def ready(self) -> bool:
        return engine_answers()

    def request_stop(self, pid: int) -> None:
        """SIGTERM dockerd alone, so it stops its containers and its containerd in order; the
        process-group kill of Service.stop only sweeps up what is left after the timeout."""
        log.info("docker.stop", pid=pid)
        os.kill(pid, signal.SIGTERM)

    def start(self) -> None:
        if self.pid() is None and engine_answers():
            log.info("docker.engine_present", how="an engine K2 did not start answers; using it")
            return
        super().start()


def ensure_engine() -> None:
    """A Docker engine answers afterwards, or StackError says why none could be started."""
    if not engine_answers():
        DockerEngine().start()


def stop_engine() -> None:
    """Stop the dockerd K2 started (by its PID); an engine started by others is left alone."""
    DockerEngine().stop(timeout=60)


@contextlib.contextmanager
def engine_left_as_found() -> Iterator[None]:
    """Whatever starts an engine within (on demand, maybe several times), none is left running
    after that had not answered before: one that had is someone else's, and stays."""
    answered = engine_answers()
    try:
        yield
    finally:
        if not answered:
            stop_engine()


def engine_unavailable_reason() -> str | None:
    """None if an engine answers or can be started here; else why not (for skips)."""
    if engine_answers():
        return None
    if os.geteuid() != 0:
        return "no Docker engine answers and K2 can start one only as root"
    if not shutil.which("dockerd") and not shutil.which("apt-get"):
        return "no Docker engine answers, `dockerd` is not installed and there is no apt-get to install docker.io"
    return None


# Debian base images ------------------------------------------------------------------------
def _rootfs_key(suite: str, packages: Sequence[str], files: Mapping[str, bytes | str],
                hooks: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps([ROOTFS_FORMAT, suite, DEBIAN_MIRROR, sorted(packages), sorted(hooks)]).encode())
    if files:  # tarballs with files made before they replaced same-named entries held duplicates
        digest.update(b"files replace entries")
    for name in sorted(files):
        content = files[name]
        digest.update(name.encode() + b"\0" + (content.encode() if isinstance(content, str) else content))
    return digest.hexdigest()[:16]


def debian_rootfs(packages: Sequence[str], *, suite: str = DEBIAN_SUITE,
                  files: Mapping[str, bytes | str] | None = None, hooks: Sequence[str] = (),
                  variant: str = "minbase") -> Path:
    """A tarball of a Debian `suite` (mmdebstrap `variant`: minbase, or extract for packages
    unpacked without dpkg) with `packages`, `files` ({absolute path: content}, mode 0755 if it
    starts with "#!") and mmdebstrap `--customize-hook`s applied; built once per key under
    cache_dir()/rootfs/."""
    files = dict(files or {})
    key = _rootfs_key(suite, packages, files, [variant, *hooks])
    out = cache_dir() / "rootfs" / f"{suite}-{key}.tar"
    if out.exists():
        return out
    if os.geteuid() != 0:
        raise StackError("building a Debian root filesystem needs root (mmdebstrap in root mode)")
    if not shutil.which("mmdebstrap"):
        apt_install("mmdebstrap", timeout=600)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            cmd = ["mmdebstrap", f"--variant={variant}", "--mode=root", "--format=tar",
                   # no docs, man pages or apt lists: images stay small
                   *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
                   # …but Java's postinst links its man page through update-alternatives, which
                   # fails where the folder is missing (openjdk-*-jre-headless)
                   "--essential-hook=mkdir -p \"$1\"/usr/share/man/man1",
                   "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
                   *(f"--customize-hook={hook}" for hook in hooks)]
            if packages:
                cmd.append(f"--include={','.join(packages)}")
            partial = Path(tmp) / "rootfs.tar"
            cmd += [suite, str(partial), DEBIAN_MIRROR]
            log.info("docker.rootfs", suite=suite, packages=list(packages), key=key)
            run(["nice", *cmd], what=f"mmdebstrap {suite}", timeout=1800)
            _put_files(partial, files, Path(tmp) / "with-files.tar")
            os.replace(Path(tmp) / "with-files.tar" if files else partial, out)
    return out


def _put_files(tarball: Path, files: Mapping[str, bytes | str], out: Path) -> None:
    """Write `tarball` with `files` (root-owned; 0755 for scripts) to `out`, replacing a package's
    entry of the same path: `docker import` refuses a tarball that names a path twice."""
    if not files:
        return
    names = {"./" + name.lstrip("/") for name in files}
    with tarfile.open(tarball) as source, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in source:
            if member.name not in names:
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo("./" + name.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), 0o755 if data.startswith(b"#!") else 0o644, 0
            tar.addfile(info, io.BytesIO(data))


def image_label(tag: str, label: str) -> str | None:
    proc = subprocess.run(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', tag],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


def debian_image(tag: str, packages: Sequence[str], *, suite: str = DEBIAN_SUITE,
                 files: Mapping[str, bytes | str] | None = None, hooks: Sequence[str] = (),
                 variant: str = "minbase", changes: Sequence[str] = ()) -> str:
    """`docker import` the rootfs of `debian_rootfs(...)` as `tag` with Dockerfile `changes`
    (e.g. 'ENV PATH=…', 'ENTRYPOINT ["/x"]', 'USER 1000'); skipped when `tag` was imported from
    the same rootfs with the same changes. Returns `tag`."""
    rootfs = debian_rootfs(packages, suite=suite, files=files, hooks=hooks, variant=variant)
    key = hashlib.sha256(json.dumps([rootfs.name, list(changes)]).encode()).hexdigest()[:16]
    if image_label(tag, "k2.rootfs") == key:
        return tag
    cmd = ["docker", "import"]
    for change in [*changes, f"LABEL k2.rootfs={key}"]:
        cmd += ["--change", change]
    run([*cmd, str(rootfs), tag], what=f"docker import {tag}", timeout=900)
    return tag


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m k2.stack.docker", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.action == "up":
        ensure_engine()
    elif args.action == "down":
        stop_engine()
    else:
        engine = DockerEngine()
        print(f"engine answers: {engine_answers()}; started by K2: {engine.pid() is not None} ({engine.pid_path})")


if __name__ == "__main__":
    main()
