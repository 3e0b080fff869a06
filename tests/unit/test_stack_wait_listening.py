"""`k2.stack.kube.wait_listening`, which `port_forward` uses so that nobody connects to a
port-forward before kubectl listens (CI once got "connection refused" from one), on real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import IO

import pytest

from k2.stack.base import StackError, free_port
from k2.stack.kube import wait_listening

pytestmark = pytest.mark.unit

LATE_SERVER = """
import http.server, sys, time
time.sleep(1.5)  # as kubectl does: a moment passes between the start and the bind
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


@contextlib.contextmanager
def running(code: str, *args: str) -> Iterator[tuple[subprocess.Popen, IO[bytes]]]:
    with tempfile.TemporaryFile() as errors, subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=errors) as proc:
        try:
            yield proc, errors
        finally:
            proc.kill()


def test_returns_once_the_process_listens_and_not_before():
    port = free_port()
    with running(LATE_SERVER, str(port)) as (proc, errors):
        started = time.monotonic()
        wait_listening(proc, port, errors, "late server", timeout=30)
        assert time.monotonic() - started >= 1.0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200


def test_a_process_that_exits_first_is_reported_with_its_stderr():
    with running("import sys; print('error: pod not found', file=sys.stderr); sys.exit(3)") as (proc, errors), \
            pytest.raises(StackError, match=r"kubectl-like exited 3 \(port \d+\): error: pod not found"):
        wait_listening(proc, free_port(), errors, "kubectl-like", timeout=30)


def test_a_process_that_never_listens_times_out():
    with running("import time; time.sleep(60)") as (proc, errors), \
            pytest.raises(StackError, match=r"silent not listening after 1s"):
        wait_listening(proc, free_port(), errors, "silent", timeout=1)
