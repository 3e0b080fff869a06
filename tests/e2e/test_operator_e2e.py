"""Custom resources → operator → the workloads it renders, run as local processes → API answers.

No kubelet runs here, so the test plays it (the `k2op` helpers `start_container` and friends):
for each Job/Deployment the operator created it starts the container's command with the
container's environment, both read from the objects in the apiserver, never re-typed.
"""

from __future__ import annotations

import datetime as dt
import signal
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.asx]


def _expected_summary(asx_root: Path, company_id: str, day: dt.date) -> dict[str, Decimal | int]:
    """Plain Python over the CSV: the day's trades in (time, file order)."""
    rows = []
    for index, line in enumerate((asx_root / "trades" / f"{company_id}.csv").read_text().splitlines()):
        fields = line.split(",")
        if dt.datetime.strptime(fields[0], "%m/%d/%Y").date() == day:
            rows.append((fields[1], index, Decimal(fields[2]), int(fields[3])))
    rows.sort()
    volume = sum(r[3] for r in rows)
    vwap = (sum(r[2] * r[3] for r in rows) / volume).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)
    return {"open": rows[0][2], "high": max(r[2] for r in rows), "low": min(r[2] for r in rows),
            "close": rows[-1][2], "volume": volume, "trade_count": len(rows), "vwap": vwap}


def test_samples_reconciled_then_run_as_processes_serve_exact_figures(
        cluster, namespace, operator, asset_class, k2op, catalog, asx_root, tmp_path, api_key):
    for doc in k2op.load_samples(asset_class):
        if doc["kind"] == "IngestionPipeline" and doc["metadata"]["name"] == "asx":
            doc["spec"]["source"]["asxCsv"]["path"] = str(asx_root)  # the volume's content, here
        if doc["kind"] == "IngestionPipeline" and doc["metadata"]["name"] != "asx":
            continue
        cluster.create(namespace, doc)
    for kind, name in (("IcebergTable", "market-trades"), ("IngestionPipeline", "asx"), ("QueryService", "k2-api")):
        cluster.wait_condition(namespace, kind, name, timeout=120)

    jobs = cluster.batch.list_namespaced_job(namespace).items
    (ingest_job,) = [j for j in jobs if "ingest" in j.metadata.name]
    deployments = {d.metadata.name: d for d in cluster.apps.list_namespaced_deployment(namespace).items}
    stream = next(d for n, d in deployments.items() if "stream" in n or "consumer" in n)
    api = next(d for n, d in deployments.items() if "api" in n)

    ingest = k2op.start_container(cluster, namespace, ingest_job.spec.template.spec, tmp_path / "ingest.log")
    assert ingest.wait(timeout=300) == 0, (tmp_path / "ingest.log").read_text()[-3000:]

    table_doc = next(d for d in k2op.load_samples(asset_class) if d["kind"] == "IcebergTable")
    table_namespace = table_doc["spec"]["namespace"]

    def all_rows_stored() -> bool:
        try:
            counts = [catalog.load_table(f"{table_namespace}.{kind}").refresh().scan().count()
                      for kind in ("trades", "quotes")]
        except Exception:  # noqa: BLE001 - the tables fill while we look
            return False
        return counts == [200_545, 169_629]

    consumer = k2op.start_container(cluster, namespace, stream.spec.template.spec, tmp_path / "stream.log")
    try:
        k2op.wait_for(all_rows_stored, "all ASX rows in Iceberg", timeout=240)
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=60) == 0, (tmp_path / "stream.log").read_text()[-3000:]

    server = k2op.start_container(cluster, namespace, api.spec.template.spec, tmp_path / "api.log")
    try:
        port = api.spec.template.spec.containers[0].ports[0].container_port
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        k2op.wait_for(healthy, "API up", timeout=60)
        answer = httpx.get(f"{base}/v1/summary/BHP/2014-03-10", headers={"X-API-Key": api_key},
                           timeout=30).raise_for_status().json()
        expected = _expected_summary(asx_root, "7078", dt.date(2014, 3, 10))
        for field, value in expected.items():
            got = answer[field]
            assert (Decimal(got) if isinstance(value, Decimal) else got) == value, field
    finally:
        server.terminate()
        server.wait(timeout=30)
