"""The Docker engine K2 starts on demand, and the Debian base images it imports.

Needs root (or an engine that already answers); otherwise skipped with the reason (the session's
`docker_engine` fixture, which stops at the session's end the engine it started). An engine that
already answered before the test and that K2 did not start is used but never stopped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from k2.stack import docker

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800), pytest.mark.usefixtures("docker_engine")]

TAG = "k2-test/busybox:stack-docker"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


def busybox_image() -> str:
    """A tiny image: busybox-static unpacked from its Debian package, with an entrypoint."""
    return docker.debian_image(TAG, ["busybox-static"], variant="extract",
                               files={"/etc/k2-greeting": "hello from a K2 rootfs\n"},
                               changes=["ENV K2_GREETING_FILE=/etc/k2-greeting", 'ENTRYPOINT ["/bin/busybox"]'])


def engine_processes() -> list[str]:
    """Command lines of dockerd/containerd/shim processes that belong to K2's engine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(docker.RUN_DIR) in cmdline or str(docker.docker_root()) in cmdline:
            found.append(cmdline)
    return found


def test_imported_debian_image_runs_with_its_changes_and_files() -> None:
    docker.ensure_engine()

    image = busybox_image()
    plain = run("docker", "run", "--rm", image, "sh", "-c", "cat $K2_GREETING_FILE")
    privileged = run("docker", "run", "--rm", "--privileged", image, "cat", "/proc/self/status")

    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "hello from a K2 rootfs\n"
    # kind nodes run privileged; where root lacks CAP_SYS_RESOURCE only the runtime wrapper makes this work
    assert privileged.returncode == 0, privileged.stderr
    assert "CapEff:" in privileged.stdout


def test_imported_image_is_reused_when_nothing_changed() -> None:
    docker.ensure_engine()
    busybox_image()
    first = run("docker", "image", "inspect", "--format", "{{.Id}}", TAG).stdout

    busybox_image()

    assert run("docker", "image", "inspect", "--format", "{{.Id}}", TAG).stdout == first


@pytest.mark.skipif(docker.engine_answers(), reason="an engine was already running before this test; "
                    "it is not stopped under whoever uses it")
@pytest.mark.skipif(os.geteuid() != 0, reason="starting dockerd needs root")
def test_engine_started_on_demand_stops_by_its_pid_leaving_nothing() -> None:
    engine = docker.DockerEngine()
    docker.ensure_engine()
    pid = engine.pid()
    assert pid is not None and docker.engine_answers()
    container = run("docker", "run", "--rm", "-d", busybox_image(), "sleep", "600")
    assert container.returncode == 0, container.stderr

    docker.stop_engine()

    assert engine.pid() is None
    assert not Path(f"/proc/{pid}").exists()
    assert not docker.engine_answers()
    assert engine_processes() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="starting dockerd needs root")
def test_engine_left_as_found_stops_only_an_engine_started_within() -> None:
    """What the session's `docker_engine` fixture relies on: a run of the image, docker and kind
    tests once left the dockerd it had started running after the session ended."""
    docker.stop_engine()  # K2's own, the session's (a later test starts it again); never another's
    if docker.engine_answers():
        pytest.skip("an engine K2 did not start answers: it is not stopped under whoever uses it")

    with docker.engine_left_as_found():
        docker.ensure_engine()
        assert docker.engine_answers()

    assert not docker.engine_answers()
    assert engine_processes() == []
    docker.ensure_engine()
    with docker.engine_left_as_found():
        pass
    assert docker.engine_answers(), "an engine that answered before was stopped"


def _rebuild(tag: str, label: str, content: str, tmp_path: Path) -> str:
    """Build `tag` from the busybox image with one file, and a label; returns the image ID."""
    (tmp_path / "built").write_text(content)
    (tmp_path / "Dockerfile").write_text(f"FROM {busybox_image()}\nLABEL {label}\nCOPY built /built\n")
    built = subprocess.run(["docker", "build", "--quiet", "--tag", tag, str(tmp_path)], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert built.returncode == 0, built.stderr
    return built.stdout.strip()


def test_a_rebuild_leaves_no_superseded_k2_image_and_keeps_others(tmp_path: Path) -> None:
    """The K2 image is rebuilt whenever the checkout changes; the untagged copies it left (1 GB
    each) once filled the disk of a kind run. K2 prunes its own; an image of others stays."""
    from k2.stack import images

    docker.ensure_engine()
    old_k2 = _rebuild("k2-test/prune:k2", f"{images.LABEL}=old", "one", tmp_path)
    _rebuild("k2-test/prune:k2", f"{images.LABEL}=new", "two", tmp_path)
    old_other = _rebuild("k2-test/prune:other", "someone.else=1", "one", tmp_path)
    _rebuild("k2-test/prune:other", "someone.else=1", "two", tmp_path)
    try:
        images._prune_superseded()

        assert run("docker", "image", "inspect", old_k2).returncode != 0, "a superseded K2 image is kept"
        assert run("docker", "image", "inspect", old_other).returncode == 0, "another's image was removed"
    finally:
        run("docker", "rmi", "--force", "k2-test/prune:k2", "k2-test/prune:other", old_other)
