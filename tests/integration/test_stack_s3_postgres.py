"""The S3 server and PostgreSQL of the local stack, proven together as an Iceberg lakehouse.

A pyiceberg SQL catalog lives in the Postgres service and the table data in the S3 bucket; the
rows are read back with pyiceberg and, from the planned Parquet files, with DuckDB. The services
come from the session fixtures of tests/conftest.py (started if not already up, stopped after).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from pyarrow.fs import S3FileSystem
from pyiceberg.catalog.sql import SqlCatalog

from k2.stack.base import Service, StackError, free_port
from k2.stack.postgres import Postgres
from k2.stack.s3 import S3

pytestmark = pytest.mark.integration

TRADES = pa.schema([
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("price", pa.float64(), nullable=False),
    pa.field("qty", pa.int64(), nullable=False),
])


def _trades(rows: list[tuple[str, int, float, int]]) -> pa.Table:
    symbol, second, price, qty = zip(*rows, strict=True)
    ts = [datetime(2014, 3, 3, 10, 0, s, tzinfo=UTC) for s in second]
    return pa.Table.from_arrays([pa.array(symbol), pa.array(ts), pa.array(price), pa.array(qty)],
                                schema=TRADES)


BATCH_1 = _trades([("BHP", 1, 37.12, 100), ("CBA", 2, 72.50, 20), ("BHP", 3, 37.15, 250)])
BATCH_2 = _trades([("RIO", 4, 61.03, 40), ("BHP", 5, 37.10, 75)])


@pytest.fixture
def catalog(s3: S3, postgres: Postgres) -> Iterator[tuple[SqlCatalog, str]]:
    # A namespace of its own per run: the catalog and bucket persist across runs.
    namespace = f"it_{uuid.uuid4().hex[:12]}"
    cat = SqlCatalog("k2", uri=postgres.sqlalchemy_url, warehouse=f"s3://{s3.bucket}/warehouse", **{
        "s3.endpoint": s3.endpoint,
        "s3.access-key-id": s3.access_key,
        "s3.secret-access-key": s3.secret_key,
        "s3.region": s3.region,
    })
    cat.create_namespace(namespace)
    yield cat, namespace
    for identifier in cat.list_tables(namespace):
        cat.purge_table(identifier)
    cat.drop_namespace(namespace)
    cat.engine.dispose()
    # purge_table leaves the folder markers pyarrow re-creates after deleting a folder's last file.
    for key in _keys(s3, f"warehouse/{namespace}/"):
        s3.client().delete_object(Bucket=s3.bucket, Key=key)


def _keys(s3: S3, prefix: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_iceberg_table_on_postgres_catalog_and_s3(s3: S3, postgres: Postgres,
                                                   catalog: tuple[SqlCatalog, str]) -> None:
    cat, namespace = catalog
    table = cat.create_table(f"{namespace}.trades", schema=TRADES)
    table.append(BATCH_1)
    table.append(BATCH_2)

    # The catalog really is the Postgres service: its row points at the current metadata.
    with closing(postgres.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT metadata_location FROM iceberg_tables "
                    "WHERE table_namespace = %s AND table_name = 'trades'", (namespace,))
        assert cur.fetchone() == (cat.load_table(f"{namespace}.trades").metadata_location,)

    table = cat.load_table(f"{namespace}.trades")
    expected = pa.concat_tables([BATCH_1, BATCH_2]).sort_by([("ts", "ascending")])
    assert table.scan().to_arrow().sort_by([("ts", "ascending")]).to_pylist() == expected.to_pylist()
    bhp = table.scan(row_filter="symbol == 'BHP'", selected_fields=("qty",)).to_arrow()
    assert sorted(bhp.column("qty").to_pylist()) == [75, 100, 250]

    data_files = [task.file.file_path for task in table.scan().plan_files()]
    assert len(data_files) == 2  # one Parquet file per append
    assert all(path.startswith(f"s3://{s3.bucket}/warehouse/") for path in data_files)

    keys = _keys(s3, f"warehouse/{namespace}/")
    assert {path.removeprefix(f"s3://{s3.bucket}/") for path in data_files} <= keys
    assert any(key.endswith(".metadata.json") for key in keys)

    # DuckDB reads the planned files through pyarrow's S3 client, so it needs no httpfs: with
    # autoinstall/autoload off, any attempt to fetch an extension would fail the query instead.
    fs = S3FileSystem(endpoint_override=s3.endpoint, access_key=s3.access_key,
                      secret_key=s3.secret_key, region=s3.region)
    trades = pads.dataset([path.removeprefix("s3://") for path in data_files], format="parquet",
                          filesystem=fs)
    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    con.register("trades", trades)
    rows = con.execute("SELECT symbol, count(*), sum(qty), round(max(price), 2) FROM trades "
                       "GROUP BY symbol ORDER BY symbol").fetchall()
    assert rows == [("BHP", 3, 425, 37.15), ("CBA", 1, 20, 72.5), ("RIO", 1, 40, 61.03)]
    # Through Arrow: DuckDB's own Python conversion of TIMESTAMPTZ would need pytz.
    span = con.execute("SELECT min(ts) AS first, max(ts) AS last FROM trades").fetch_arrow_table()
    assert span.to_pylist() == [{"first": datetime(2014, 3, 3, 10, 0, 1, tzinfo=UTC),
                                 "last": datetime(2014, 3, 3, 10, 0, 5, tzinfo=UTC)}]
    loaded = {name for (name,) in con.execute(
        "SELECT extension_name FROM duckdb_extensions() WHERE loaded AND install_mode != 'STATICALLY_LINKED'"
    ).fetchall()}
    assert loaded == set()
    con.close()



@pytest.mark.parametrize(("service", "env_var"), [(S3, "K2_S3_PORT"), (Postgres, "K2_POSTGRES_PORT")])
def test_port_in_use_names_the_env_var(service: type[Service], env_var: str, tmp_path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_STATE_DIR", str(tmp_path))  # no PID file: a fresh start is attempted
    svc = service()
    # Move every port of the service off the stack's own (maybe running) instance first.
    for var in (svc.port_env, *svc.extra_ports()):
        monkeypatch.setenv(var, str(free_port()))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        monkeypatch.setenv(env_var, str(squatter.getsockname()[1]))
        with pytest.raises(StackError, match=env_var):
            svc.start()
