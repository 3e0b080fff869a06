"""`k2 stack up`/`down` track and stop every process they start, and never start a second copy.

This stack runs on free ports and a state folder of its own, never the session stack the other
tests use, through the real CLI in child processes as `make dev-up`/`make dev-down` run it. After
each `down` no process of it is left: not the PIDs recorded at `up` nor anything of their process
groups, no process working in its state folder, nothing listening on its ports, and
`k2 stack status` says "stopped" for each service. After each `up` status says "ready" and each
port is held by the service's own processes.

Cycles: ten of PostgreSQL, the S3 server, etcd, kube-apiserver and kube-controller-manager (the
services issue 12 saw left running or refusing to start again), a few seconds each; the whole
stack with Kafka and the Java registry takes about 40 s a cycle on the 2-core test machine, so
`make test` cycles it twice, not ten times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from k2 import stack
from k2.stack.base import free_port, group_members, listeners

pytestmark = pytest.mark.integration

K2 = str(Path(sys.executable).with_name("k2"))
LIGHT = ("postgres", "s3", "etcd", "kube-apiserver", "kube-controller-manager")
EVERY = [*stack.services(kube=True), *stack.peers()]


@dataclass
class OwnStack:
    folder: Path
    env: dict[str, str]

    def k2(self, *args: str, timeout: float = 420) -> str:
        proc = subprocess.run([K2, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"k2 {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    def status(self) -> dict[str, dict]:
        return {row["service"]: row for row in json.loads(self.k2("stack", "status", "--json"))}

    def ports(self) -> dict[str, list[int]]:
        return {s.name: [int(self.env[var]) for var in s.ports()] for s in EVERY}

    def recorded(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in (self.folder / "pids").glob("*.pid")}

    def roots(self) -> set[int]:
        """One per copy of a service: the processes of the folder whose parent is not in it."""
        pids = {int(p.split()[0]) for p in self.processes_in_folder()}
        return {pid for pid in pids if psutil.Process(pid).ppid() not in pids}

    def processes_in_folder(self) -> list[str]:
        found = []
        for proc in psutil.process_iter(["cwd", "status", "cmdline"]):
            cwd = proc.info["cwd"]
            if cwd and proc.info["status"] != psutil.STATUS_ZOMBIE and Path(cwd).is_relative_to(self.folder):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        return found


@pytest.fixture(scope="module")
def own_stack() -> Iterator[OwnStack]:
    # Not under pytest's 0700 tmp folders: PostgreSQL, running as its own user, must reach it.
    folder = Path(tempfile.mkdtemp(prefix="k2-stack-lifecycle-"))
    folder.chmod(0o755)
    variables = sorted({var for s in EVERY for var in s.ports()})
    ports: set[int] = set()
    while len(ports) < len(variables):
        ports.add(free_port())
    env = {**os.environ, "K2_STATE_DIR": str(folder), **dict(zip(variables, map(str, sorted(ports)), strict=True))}
    own = OwnStack(folder, env)
    yield own
    own.k2("stack", "down")
    shutil.rmtree(folder, ignore_errors=True)


def assert_up(own: OwnStack, names: tuple[str, ...]) -> dict[str, int]:
    status, recorded, ports = own.status(), own.recorded(), own.ports()
    for name in names:
        assert status[name]["status"] == "ready", status[name]
        members = set(group_members(recorded[name]))
        main = ports[name][0]
        assert listeners(main) and listeners(main) <= members, f"{name}: port {main} held by {listeners(main)}"
    for name in status.keys() - set(names):
        assert status[name]["status"] == "stopped", status[name]
    return {name: recorded[name] for name in names}


def assert_down(own: OwnStack, started: dict[str, int]) -> None:
    status = own.status()
    assert {name: row["status"] for name, row in status.items()} == dict.fromkeys(status, "stopped")
    for name, pid in started.items():
        assert group_members(pid) == [], f"{name}: processes of group {pid} are left"
    for name, ports in own.ports().items():
        for port in ports:
            assert not listeners(port), f"{name}: port {port} still has listeners {listeners(port)}"
    assert own.processes_in_folder() == []
    assert not list((own.folder / "pids").glob("*.pid"))


def cycle(own: OwnStack, up_args: tuple[str, ...], names: tuple[str, ...]) -> None:
    own.k2("stack", "down")
    own.k2("stack", "up", *up_args)
    started = assert_up(own, names)
    own.k2("stack", "down")
    assert_down(own, started)


def test_ten_cycles_of_the_control_plane_and_storage_leave_nothing(own_stack: OwnStack):
    for _ in range(10):
        cycle(own_stack, ("--kube", "--only", ",".join(LIGHT)), LIGHT)


def test_cycles_of_the_whole_stack_leave_nothing(own_stack: OwnStack):
    every = tuple(s.name for s in stack.services(kube=True))
    for _ in range(2):
        cycle(own_stack, ("--kube",), every)


def test_up_while_up_and_two_ups_at_once_start_one_copy(own_stack: OwnStack):
    up = ("stack", "up", "--kube", "--only", ",".join(LIGHT))
    own_stack.k2("stack", "down")
    with ThreadPoolExecutor(2) as pool:  # `make dev-up` while a test session starts the same services
        list(pool.map(lambda _: own_stack.k2(*up), range(2)))
    started = assert_up(own_stack, LIGHT)
    roots = own_stack.roots()
    assert len(roots) == len(LIGHT), own_stack.processes_in_folder()

    own_stack.k2(*up)

    assert assert_up(own_stack, LIGHT) == started
    assert own_stack.roots() == roots
    own_stack.k2("stack", "down")
    assert_down(own_stack, started)
