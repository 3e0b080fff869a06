"""A stream whose poll loop is stuck fails its liveness probe: `/livez` follows the loop's
heartbeat, where `/metrics` (served from prometheus-client's own thread) would keep answering."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from k2 import observability
from k2.stack.base import free_port
from k2.stream.runner import Progress

pytestmark = pytest.mark.unit


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_livez_fails_once_the_poll_loop_stops_turning() -> None:
    port = free_port()
    server = observability.serve_metrics(port, host="127.0.0.1")
    assert server is not None
    progress = Progress(stall_seconds=0.3)
    try:
        with observability.liveness(progress.check):
            progress.beat()
            assert status(port, "/livez") == 200
            time.sleep(0.5)  # the loop is stuck: no beat
            assert status(port, "/livez") == 503
            assert status(port, "/metrics") == 200, "the metrics thread answers regardless"
            progress.beat()
            assert status(port, "/livez") == 200
    finally:
        server.shutdown()
