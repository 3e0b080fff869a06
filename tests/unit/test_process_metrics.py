"""Every K2 process serves the Python process and platform metrics next to its `k2_*` ones.

The stream, ingest and operator processes serve `observability.serve_metrics` on their metrics
port; the API serves the same registry on its `/metrics` route. Both are scraped here and must
carry what the dashboard's process panels and the process alerts query.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from k2 import observability
from k2.api.app import create_app
from k2.settings import Settings
from k2.stack.base import free_port

pytestmark = pytest.mark.unit
PROCESS_SERIES = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                  "process_max_fds", "process_start_time_seconds", "python_info",
                  "python_gc_objects_collected_total"}


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def check(found: dict[str, float]) -> None:
    assert found.keys() >= PROCESS_SERIES, PROCESS_SERIES - found.keys()
    assert found["process_resident_memory_bytes"] > 1_000_000
    assert 0 < found["process_open_fds"] < found["process_max_fds"]
    assert found["process_start_time_seconds"] == pytest.approx(psutil.Process().create_time(), abs=2)
    assert "k2_feed_lag_seconds" in found  # the same registry as the k2_* metrics


def test_the_metrics_port_of_stream_ingest_and_operator_serves_process_metrics():
    port = free_port()
    server = observability.serve_metrics(port, host="127.0.0.1")
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            check(samples(resp.read().decode()))
    finally:
        server.shutdown()


def test_the_api_metrics_route_serves_process_metrics(tmp_path: Path):
    settings = Settings(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "warehouse"))
    with TestClient(create_app(settings)) as api:
        response = api.get("/metrics")
    assert response.status_code == 200
    check(samples(response.text))
