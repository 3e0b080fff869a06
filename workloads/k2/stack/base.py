"""How a local service is installed, started, probed and stopped.

Every service of the local stack is a real program (Kafka, a schema registry, PostgreSQL, an S3
server, kube-apiserver…). They differ only in how they are obtained and how they prove they
serve, so each is one `Service` subclass and this module does the rest the same way for all:
idempotent start, a port check that names the env var to change, readiness polled on the real
protocol, logs and a PID file under the state folder, stop by recorded PID (whole process group).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger("k2.stack")


class StackError(RuntimeError):
    """A service could not be installed, started or stopped; the message says what to do."""


def cache_dir() -> Path:
    """Downloads and builds, keyed by version, outside any checkout so fresh clones reuse them."""
    path = Path(os.environ.get("K2_CACHE_DIR", Path.home() / ".cache" / "k2"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """Data, logs and PID files of running services (per checkout unless K2_STATE_DIR is set)."""
    path = Path(os.environ.get("K2_STATE_DIR", Path.cwd() / ".k2" / "state")).absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_from_env(env_var: str, default: int) -> int:
    raw = os.environ.get(env_var)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise StackError(f"{env_var}={raw!r} is not a port number") from exc


def free_port() -> int:
    """A loopback port nobody listens on right now (another process could take it before the caller binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def listeners(port: int) -> set[int]:
    """PIDs of the processes listening on TCP `port` (any address)."""
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with suppress(psutil.Error, ProcessLookupError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
    return members


def _unreaped_child(pid: int) -> bool:
    """True while `pid` is a child of this process that has not ended, reaping it once it has.
    The group listing alone is not enough for our own children: a multi-threaded leader whose
    main thread ended shows as a zombie while its other threads still run (Go daemons do), and
    one that ended must be reaped here or it stays in /proc."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not ours, or reaped already: the listing decides
        return False


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        what: str = "", timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run an install/build step; on failure raise with the tail of its output."""
    log.info("stack.run", cmd=" ".join(map(str, cmd))[:300], what=what)
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        raise StackError(f"{what or cmd[0]} failed (exit {proc.returncode}):\n{tail}")
    return proc


def apt_install(package: str, *, timeout: float = 1200) -> None:
    """Install one Debian package (root on a Debian machine: what the stack and its images need)."""
    log.info("stack.apt_install", package=package)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, what="apt-get update", timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", package], env=env,
        what=f"apt-get install {package}", timeout=timeout)


def run_logged(cmd: list[str], *, cwd: Path | str, env: dict[str, str], log_path: Path, what: str,
               timeout: float) -> None:
    """Run a long build step with its whole output in `log_path`; on failure or timeout raise
    with the log's tail, so a cold build that breaks says why without a second run."""
    with open(log_path, "w") as logf:
        logf.write(" ".join(cmd) + "\n")
        logf.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"{what} took over {timeout:.0f}s; see {log_path}") from exc
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise StackError(f"{what} failed (exit {proc.returncode}); {log_path}:\n{tail}")


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if not path:
        raise StackError(f"`{name}` is not on PATH: {hint}")
    return path


def unpack_tar(tarball: Path, into: Path) -> None:
    """Unpack a downloaded archive, refusing members that would land outside `into` (absolute
    paths, `..`, links out, devices). The checks are made here because Debian 12's python3
    (3.11.2) predates tarfile's "data" filter and because that filter strips an absolute path's
    leading slash instead of refusing it; where the filter exists it is applied as well."""
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for member in members:
            _check_inside(tarball, into, member)
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:
                tar.extractall(into, members=members)
        except tarfile.TarError as exc:
            raise StackError(f"{tarball.name}: {exc}") from exc


def _check_inside(tarball: Path, into: Path, member: tarfile.TarInfo) -> None:
    root = into.resolve()
    target = (root / member.name).resolve()
    if not target.is_relative_to(root) or Path(member.name).is_absolute():
        raise StackError(f"{tarball.name}: {member.name!r} would be written outside {into}")
    if member.isdev():
        raise StackError(f"{tarball.name}: {member.name!r} is a device file")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else root
        if Path(member.linkname).is_absolute() or not (base / member.linkname).resolve().is_relative_to(root):
            raise StackError(f"{tarball.name}: link {member.name!r} points outside {into}")


@dataclass
class Service:
    """One local service. Subclasses set the class attributes and implement the hooks."""

    name: str = ""
    port_env: str = ""
    default_port: int = 0
    start_timeout: float = 120.0

    @property
    def port(self) -> int:
        return port_from_env(self.port_env, self.default_port)

    @property
    def home(self) -> Path:
        """This service's state folder (data, config)."""
        path = state_dir() / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def log_path(self) -> Path:
        return state_dir() / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return state_dir() / "pids" / f"{self.name}.pid"

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        """Fetch or build the program into cache_dir(); must be idempotent and fast when cached."""

    def prepare(self) -> None:
        """One-time state setup (format storage, initdb…); must be idempotent."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def ready(self) -> bool:
        """True once the service answers on its real protocol (not merely an open port)."""
        raise NotImplementedError

    def after_ready(self) -> None:
        """Post-start provisioning (create a bucket, a database…); must be idempotent."""

    def extra_ports(self) -> dict[str, int]:
        """Other ports the service binds, by env var, checked before start."""
        return {}

    def run_as(self) -> str | None:
        """A system user to drop to (PostgreSQL refuses to run as root)."""
        return None

    # lifecycle ---------------------------------------------------------------------------
    def ports(self) -> dict[str, int]:
        """Every port the service binds, by the env var that sets it."""
        return {self.port_env: self.port, **self.extra_ports()}

    def pid(self) -> int | None:
        """The recorded leader PID while any process of its group lives, else None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _unreaped_child(pid) or group_members(pid) else None

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Held across a whole start or stop: a second `k2 stack up` waits, then finds it running."""
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.pid_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def safe_ready(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:  # noqa: BLE001 - a probe failing only means "not yet"
            return False

    def start(self) -> None:
        with self._exclusive():
            self._start()

    def _start(self) -> None:
        if self.pid() is not None:
            if self._wait_ready(self.start_timeout):
                self.after_ready()  # idempotent: repairs provisioning an earlier start did not finish
                log.info("stack.already_running", service=self.name, port=self.port)
                return
            raise StackError(f"{self.name} is running (pid {self.pid()}) but does not answer; "
                             f"see {self.log_path}")
        for env_var, port in self.ports().items():
            if port_in_use(port):
                raise StackError(f"{self.name}: port {port} is already in use by another process; "
                                 f"free it or set {env_var} to another port")
        self.install()
        self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        user = self.run_as()
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *cmd]
        log.info("stack.start", service=self.name, port=self.port, cmd=" ".join(cmd)[:300])
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **self.environment()}, start_new_session=True,
                                    cwd=self.home)
        self.pid_path.write_text(str(proc.pid))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._stop(timeout=10)  # children it left behind
                raise StackError(f"{self.name} exited with {proc.returncode} while starting:\n"
                                 f"{self.log_tail()}")
            if self.safe_ready():
                self.after_ready()
                log.info("stack.ready", service=self.name, port=self.port, pid=proc.pid)
                return
            time.sleep(0.3)
        self._stop()
        raise StackError(f"{self.name} did not become ready within {self.start_timeout:.0f}s:\n"
                         f"{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.safe_ready():
                return True
            if self.pid() is None:
                return False
            time.sleep(0.3)
        return False

    def request_stop(self, pid: int) -> None:
        """Ask the service to shut down cleanly; what is left after the timeout is killed."""
        os.killpg(pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        with self._exclusive():
            self._stop(timeout)

    def _stop(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid is not None:
            log.info("stack.stop", service=self.name, pid=pid)
            with suppress(ProcessLookupError):
                self.request_stop(pid)
            if not self._wait_gone(pid, timeout):
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if not self._wait_gone(pid, 10):
                    raise StackError(f"{self.name}: processes {group_members(pid)} of group {pid} survive SIGKILL")
        self.pid_path.unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def status(self) -> str:
        """What is really running: `stopped`, `ready` or `starting/unhealthy`, and who else
        holds the service's ports when that is not this service."""
        pid = self.pid()
        ours = set(group_members(pid)) if pid is not None else set()
        foreign = {port: holders for port in self.ports().values() if (holders := listeners(port) - ours)}
        if foreign:
            port, holders = next(iter(foreign.items()))
            held = f"port {port} is held by pid {', '.join(map(str, sorted(holders)))}"
            return f"stopped, but {held} (not started by this stack)" if pid is None else \
                f"running (pid {pid}) but {held}"
        if pid is None:
            return "stopped"
        return "ready" if self.safe_ready() else "starting/unhealthy"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
