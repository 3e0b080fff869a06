"""The Iceberg Kafka Connect peer on the real stack: Apicurio's converter decodes K2's Confluent
wire format from K2's registry, Iceberg's sink commits the ticks into a JDBC catalog on SQLite,
and they are the rows K2's own stream stores from the same topic (count and checksum).

Starts a Kafka Connect worker (k2.stack.iceberg_connect; its jars come from Maven Central once).
The sink's first commit waits for its control consumer's assignment (rounds before it time out
after 30 s), so this takes one to three minutes: opt in with K2_CONNECT_TESTS=1; `make bench` runs
it, `make test` does not.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pyiceberg.catalog.sql import SqlCatalog

from k2 import tables, topics
from k2.ingest.pipeline import register_schemas
from k2.kafka import PRODUCER_DEFAULTS
from k2.settings import Settings
from k2.sources.asx import unscaled_bytes
from k2.stack import connect_peer as peer
from k2.stack.iceberg_connect import CATALOG_NAME, IcebergConnect, connector_config
from k2.stream.runner import run as stream_run

pytestmark = [pytest.mark.integration, pytest.mark.connect_peer]
TICKS = 300
DAY = dt.date(2026, 1, 5)


def _trade(symbol: str, seq: int) -> dict:
    at_us = int(dt.datetime(2026, 1, 5, 0, 0, tzinfo=dt.UTC).timestamp() * 1e6) + seq * 1000
    return {"symbol": symbol, "exchange": "ASX", "exchange_timestamp": at_us,
            "exchange_date": (DAY - dt.date(1970, 1, 1)).days, "sequence_number": seq,
            "price": unscaled_bytes(36_700_000 + seq), "volume": 100 + seq, "qualifiers": None, "venue": None,
            "buyer_id": None, "ingest_timestamp": at_us, "source_id": "test"}


def test_the_sink_stores_the_ticks_k2_stores(stack, kafka, registry, tmp_path: Path, unique: str) -> None:
    connect = stack.ensure(IcebergConnect())
    settings = Settings(asset_class=f"connect{unique}", catalog_uri=f"sqlite:///{tmp_path}/k2.db",
                        warehouse=str(tmp_path / "k2-warehouse"), batch_seconds=0.2)
    topics.ensure_pipeline_topics(settings, ("trades",))
    control = f"test.connect.{unique}.control"
    topics.ensure_topic(topics.admin_client(settings.kafka_bootstrap), topics.TopicSpec(control, 1))
    encoder = register_schemas(settings, ("trades",))["trades"]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, **PRODUCER_DEFAULTS})
    for seq in range(1, TICKS + 1):
        symbol = ("BHP", "CBA", "RIO")[seq % 3]
        producer.produce(settings.topic("trades"), encoder.encode(_trade(symbol, seq)), symbol.encode())
    assert producer.flush(30) == 0

    catalog = SqlCatalog(CATALOG_NAME, uri=f"sqlite:///{tmp_path}/connect.db",
                         warehouse=(tmp_path / "connect-warehouse").as_uri())
    catalog.create_namespace("connect")
    name = f"test-{unique}"
    connect.create(name, connector_config(
        topic=settings.topic("trades"), table="connect.trades", control_topic=control,
        catalog_db=tmp_path / "connect.db", warehouse=tmp_path / "connect-warehouse",
        bootstrap=settings.kafka_bootstrap, registry_url=settings.registry_url, commit_interval_ms=1000))
    try:
        def alive() -> None:
            failed = [t for t in connect.task_states(name) if t["state"] == "FAILED"]
            assert not failed, failed[0].get("trace", "")[:3000]

        started = time.monotonic()
        peer.wait_for_rows(catalog, "connect.trades", TICKS, timeout=300, alive=alive)
        print(f"sink committed {TICKS} ticks {time.monotonic() - started:.0f} s after its creation")
    finally:
        connect.delete(name)

    assert stream_run(settings, ("trades",), until_idle=0.5).rows_written == {"market.trades": TICKS}
    ours = peer.table_fingerprint(tables.catalog(settings), settings.table_identifier("trades"), "trades")
    theirs = peer.table_fingerprint(catalog, "connect.trades", "trades")
    assert ours == theirs and ours.rows == TICKS
