"""A service that cannot be reached is one clear line: which service, the URL tried, the setting to
change. Run through the CLIs as a user would, against the real services (or a port nobody serves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2.settings import Settings
from k2.stack.base import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _run(settings: Settings, *args: str, program: str = "k2", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("K2_")}, **settings.to_env(),
           "K2_LOG_LEVEL": "WARNING"}
    return subprocess.run([str(BIN / program), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _assert_explained(proc: subprocess.CompletedProcess, *needles: str) -> str:
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in said, f"{needle!r} not in: {said}"
    return said


def test_kafka_not_there(tmp_path, embedded_settings):
    bootstrap = f"127.0.0.1:{free_port()}"
    proc = _run(embedded_settings.model_copy(update={"kafka_bootstrap": bootstrap}),
                "ingest", "synthetic", "--symbols", "1", "--days", "1", "--out", str(tmp_path / "ticks"))
    _assert_explained(proc, "Kafka could not be reached", bootstrap, "K2_KAFKA_BOOTSTRAP")


def test_registry_root_suggests_the_confluent_path(tmp_path, embedded_settings, registry):
    root = registry.url.removesuffix("/apis/ccompat/v7")
    assert root != registry.url
    proc = _run(embedded_settings.model_copy(update={"registry_url": root}),
                "ingest", "synthetic", "--symbols", "1", "--days", "1", "--out", str(tmp_path / "ticks"))
    _assert_explained(proc, "Schema Registry", root, "HTTP 404", f"K2_REGISTRY_URL={root}/apis/ccompat/v7")


def test_registry_not_there(tmp_path, embedded_settings):
    url = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
    proc = _run(embedded_settings.model_copy(update={"registry_url": url}),
                "ingest", "synthetic", "--symbols", "1", "--days", "1", "--out", str(tmp_path / "ticks"))
    _assert_explained(proc, "Schema Registry could not be reached", url, "K2_REGISTRY_URL")


def test_catalog_database_not_there_and_its_password_not_shown(embedded_settings):
    port = free_port()
    uri = f"postgresql+psycopg2://k2:s3cret@127.0.0.1:{port}/k2"
    proc = _run(embedded_settings.model_copy(update={"catalog_uri": uri}), "stream", "run", "--until-idle", "1")
    said = _assert_explained(proc, "Iceberg catalog", f"k2:***@127.0.0.1:{port}/k2", "K2_CATALOG_URI")
    assert "s3cret" not in said


def test_warehouse_object_storage_not_there(tmp_path, embedded_settings):
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = _run(embedded_settings.model_copy(update={"warehouse": "s3://k2-warehouse/probe", "s3_endpoint": endpoint}),
                "stream", "run", "--until-idle", "1")
    _assert_explained(proc, "S3 (the Iceberg warehouse) could not be reached", endpoint, "K2_S3_ENDPOINT")


def test_query_api_not_there():
    url = f"http://127.0.0.1:{free_port()}"
    proc = _run(Settings(), "symbols", "--url", url, program="k2-query")
    _assert_explained(proc, "K2 API could not be reached", url, "k2 api", "--url")
