"""The Iceberg Kafka Connect peer's logic: its Maven classpath, its configs, and the row
fingerprint that proves both sinks stored the same ticks."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from xml.etree import ElementTree

import pyarrow as pa
import pytest

from k2.stack import iceberg_connect as ic
from k2.stack.connect_peer import fingerprint

pytestmark = pytest.mark.unit
POM = "{http://maven.apache.org/POM/4.0.0}"


def test_the_pom_takes_its_versions_from_the_module_and_pins_one_jackson():
    root = ElementTree.parse(ic.RESOURCES / "pom.xml").getroot()
    deps = {d.findtext(f"{POM}artifactId"): d.findtext(f"{POM}version")
            for d in root.iterfind(f"{POM}dependencies/{POM}dependency")}
    assert deps["iceberg-kafka-connect"] == deps["iceberg-parquet"] == "${iceberg.version}"
    assert deps["connect-runtime"] == deps["connect-json"] == "${connect.version}"
    assert "apicurio-registry-utils-converter" in deps and "sqlite-jdbc" in deps
    boms = [d.findtext(f"{POM}artifactId") for d in root.iterfind(f".//{POM}dependencyManagement//{POM}dependency")]
    assert boms == ["jackson-bom"]
    args = ic.maven_command(Path("/scratch"))
    assert f"-Diceberg.version={ic.ICEBERG_VERSION}" in args and f"-Dconnect.version={ic.CONNECT_VERSION}" in args
    assert "-DoutputDirectory=/scratch/libs" in args


def test_the_registry_url_is_apicurios_v2_api_beside_its_confluent_one():
    assert ic.registry_v2_url("http://127.0.0.1:8081/apis/ccompat/v7") == "http://127.0.0.1:8081/apis/registry/v2"
    with pytest.raises(ValueError, match="not an Apicurio ccompat URL"):
        ic.registry_v2_url("http://127.0.0.1:8081/")


def _config(interval: int | None) -> dict[str, str]:
    return ic.connector_config(topic="market.equities.trades.asx", table="connect.trades", control_topic="ctl",
                               catalog_db=Path("/w/connect.db"), warehouse=Path("/w/wh"), bootstrap="127.0.0.1:9",
                               registry_url="http://127.0.0.1:8081/apis/ccompat/v7", commit_interval_ms=interval)


def test_a_sink_reads_the_confluent_wire_format_into_a_jdbc_catalog_on_sqlite():
    config = _config(1000)
    assert config["connector.class"] == ic.SINK_CLASS and config["topics"] == "market.equities.trades.asx"
    assert config["iceberg.catalog.uri"] == "jdbc:sqlite:/w/connect.db"
    assert config["iceberg.catalog.warehouse"] == "file:///w/wh"
    assert config["iceberg.control.commit.interval-ms"] == "1000"
    assert config["value.converter"] == ic.CONVERTER_CLASS
    # K2's messages carry a 4-byte content id and no headers.
    assert config["value.converter.apicurio.registry.as-confluent"] == "true"
    assert config["value.converter.apicurio.registry.use-id"] == "contentId"
    assert config["value.converter.apicurio.registry.headers.enabled"] == "false"
    assert config["value.converter.apicurio.registry.url"] == "http://127.0.0.1:8081/apis/registry/v2"


def test_a_sinks_catalog_holds_one_sqlite_connection():
    """Two connections of one catalog deadlocked on the file: one read, the other's commit was
    refused at once (SQLITE_BUSY) in every round, and the sink showed a third of the probes."""
    assert _config(1000)["iceberg.catalog.clients"] == "1"


def test_no_interval_keeps_the_sinks_default():
    assert "iceberg.control.commit.interval-ms" not in _config(None)


def test_the_worker_listens_on_loopback_only():
    props = ic.worker_properties("127.0.0.1:9092", 8083, Path("/s/offsets"))
    assert props["listeners"] == "http://127.0.0.1:8083" and props["bootstrap.servers"] == "127.0.0.1:9092"


def _k2_trades(prices: list[str]) -> pa.Table:
    """Rows as K2 stores them: timestamptz, decimal(18, 6)."""
    n = len(prices)
    return pa.table({
        "symbol": ["BHP"] * n, "exchange": ["ASX"] * n, "exchange_date": [dt.date(2014, 3, 10)] * n,
        "sequence_number": list(range(1, n + 1)),
        "exchange_timestamp": pa.array([dt.datetime(2014, 3, 10, 0, 0, i, tzinfo=dt.UTC) for i in range(n)],
                                       pa.timestamp("us", tz="UTC")),
        "price": pa.array([Decimal(p) for p in prices], pa.decimal128(18, 6)), "volume": [100] * n})


def _sink_trades(table: pa.Table) -> pa.Table:
    """The same rows as the sink stores them: epoch micros as long, decimal(38, 6)."""
    return table.set_column(4, "exchange_timestamp", table["exchange_timestamp"].cast(pa.int64())) \
        .set_column(5, "price", table["price"].cast(pa.decimal128(38, 6)))


def test_equal_rows_in_either_types_and_order_have_one_fingerprint():
    ours = _k2_trades(["36.667", "36.7", "36.71"])
    theirs = _sink_trades(ours).take([2, 0, 1])
    assert fingerprint(ours, "trades") == fingerprint(theirs, "trades")
    assert fingerprint(ours, "trades").rows == 3


def test_one_changed_figure_or_missing_row_changes_the_fingerprint():
    ours = fingerprint(_k2_trades(["36.667", "36.7", "36.71"]), "trades")
    assert fingerprint(_sink_trades(_k2_trades(["36.667", "36.7", "36.711"])), "trades") != ours
    assert fingerprint(_k2_trades(["36.667", "36.7"]), "trades") != ours


def test_the_steady_rate_leaves_out_the_first_commit(tmp_path: Path):
    from pyiceberg.catalog.sql import SqlCatalog

    from k2.stack.connect_peer import first_commit, steady_rate

    catalog = SqlCatalog("t", uri=f"sqlite:///{tmp_path}/c.db", warehouse=tmp_path.as_uri())
    catalog.create_namespace("n")
    rows = _k2_trades(["1", "2", "3"])
    table = catalog.create_table("n.t", rows.schema)
    table.append(rows)
    assert steady_rate([table]) != steady_rate([table])  # one commit: no rate (nan)
    table.append(rows.slice(0, 2))
    table = catalog.load_table("n.t")
    first_ms, last_ms = (s.timestamp_ms for s in table.snapshots())
    assert first_commit([table]) == first_ms / 1000
    if last_ms > first_ms:  # two commits within one millisecond give no rate
        assert steady_rate([table]) == pytest.approx(2000 / (last_ms - first_ms))
