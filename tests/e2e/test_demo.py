"""`make demo`'s tour end to end: stack → synthetic ticks → Kafka → Iceberg → API → chart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from k2 import tables
from k2.settings import Settings
from k2.stack.base import free_port

pytestmark = pytest.mark.e2e



def test_demo_runs_the_whole_tour_and_is_idempotent(tmp_path: Path, kafka, registry):
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_") or k.endswith("_PORT") or k == "K2_STATE_DIR"}
    env["K2_STATE_DIR"] = os.environ.get("K2_STATE_DIR", str(Path.cwd() / ".k2" / "state"))
    # Topics of its own: a Kafka kept from earlier runs must not feed this demo's first round.
    env["K2_ASSET_CLASS"] = f"demo{uuid.uuid4().hex[:8]}"
    k2 = str(Path(sys.executable).with_name("k2"))
    outputs = []
    for _ in range(2):
        proc = subprocess.run([k2, "demo", "--port", str(free_port())], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout)
    first, second = outputs
    for section in ("symbols", "daily summary", "5-minute bars", "VWAP per symbol on", "trades table history",
                    "as of now"):
        assert section in first
    # the live segment: the tail printed BHP trades of the simulated day as they printed, numbered from 1
    live = re.findall(r"^2014-03-13 \S+ BHP +#(\d+) ", first, flags=re.M)
    assert [int(n) for n in live] == list(range(1, 13)), live
    # the third day arrived after the oldest snapshot: time travel does not see it, the present does
    assert "as of the oldest snapshot: (no rows)" in first
    committed = [int(n.replace(",", "")) for n in re.findall(r"market\.trades: ([\d,]+) new rows committed", first)]
    assert len(committed) == 2 and 0 < committed[1] < committed[0], committed  # round two: only the new day
    charts = list((tmp_path / ".k2" / "demo").glob("*.png"))
    assert charts and charts[0].stat().st_size > 10_000
    assert charts[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the second run ingests the same ticks again: de-duplication leaves the tick tables as they were
    assert "market.trades: 0 new rows committed" not in first
    assert re.findall(r"market\.(?:trades|quotes): ([\d,]+) new rows committed", second) == ["0"] * 4
    # reference rows are upserted by key (the generator's end_date follows the days generated): one per company
    home = tmp_path / ".k2" / "demo"
    demo = Settings(catalog_uri=f"sqlite:///{home}/catalog.db", warehouse=str(home / "warehouse"))
    reference = tables.catalog(demo).load_table("market.reference").scan().to_arrow()
    assert sorted(reference["symbol"].to_pylist()) == ["BHP", "CBA", "RIO", "WBC"]
    trades = tables.catalog(demo).load_table("market.trades").scan(row_filter="exchange_date = '2014-03-13'")
    assert trades.to_arrow().num_rows > 12, "the stream stored the live day"
    # run without a terminal, the demo ends by saying how to reach its tables; those lines work as printed
    assert "The demo's API has stopped" in second
    exports = dict(kv.split("=", 1) for line in second.splitlines() if line.strip().startswith("export ")
                   for kv in line.split()[1:])
    assert exports["K2_CATALOG_URI"] == f"sqlite:///{home}/catalog.db", exports
    query = next(line.split("#")[0].split("(")[0].split() for line in second.splitlines()
                 if line.strip().startswith("k2-query symbols --local"))
    listed = subprocess.run([str(Path(sys.executable).with_name(query[0])), *query[1:]], cwd=tmp_path,
                            env={**env, **exports}, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "BHP" in listed.stdout, listed.stdout + listed.stderr
