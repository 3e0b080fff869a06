"""WebSocket /v1/stream on the real stack: simulator → `k2 ingest feed` → Kafka → `k2 stream run` →
Iceberg, and `k2 api` pushing ticks. A client that joins mid-day with `from` gets the stored part
from Iceberg, then Kafka from the offsets its snapshot recorded: every tick of the day exactly once,
in sequence order. A client that does not read is cut off with the reason; a bad key is refused."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from k2 import tables
from k2.settings import DEV_API_KEY
from k2.sources import asx
from k2.stack.base import free_port
from k2_synthetic import generate

pytestmark = pytest.mark.e2e
K2 = str(Path(sys.executable).with_name("k2"))
SYDNEY = asx.EXCHANGE_TZ



class Processes:
    """The k2 processes of one test; each one's log is kept in a file so a failure can show it."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.running = env, logs, []
        logs.mkdir()

    def start(self, *args: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        log = (self.logs / f"{len(self.running)}-{args[0]}.log").open("w")
        proc = subprocess.Popen([K2, *args], env=self.env, stdout=stdout, stderr=log, text=True)
        self.running.append(proc)
        return proc

    def report(self) -> str:
        """The end of every process's log, for an assertion message."""
        return "\n".join(f"--- {path.name}\n{path.read_text()[-1500:]}" for path in sorted(self.logs.iterdir()))

    def stop(self) -> None:
        for proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def live(tmp_path, embedded_settings):
    """The whole live path on one synthetic day: returns (processes, folder, api url, settings)."""
    settings = embedded_settings
    env = {**os.environ, **settings.to_env(), "K2_LOG_LEVEL": "INFO"}
    procs = Processes(env, tmp_path / "logs")
    folder = generate(tmp_path / "ticks", symbols=2, days=1, seed=5)
    yield procs, folder, settings
    procs.stop()


def _start_api(procs: Processes) -> str:
    port = free_port()
    procs.start("api", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("k2 api did not start")


def _start_feed(procs: Processes, folder: Path, *args: str) -> str:
    sim = procs.start("feed", "serve", str(folder), "--port", "0", *args, stdout=subprocess.PIPE)
    line = sim.stdout.readline()
    assert line.startswith("k2 feed: ws://"), line
    return line.split(": ", 1)[1].strip()


def _day_trades(folder: Path) -> dict[str, list[int]]:
    expected: dict[str, list[int]] = defaultdict(list)
    for tick_file in asx.discover(folder, kinds=("trades",)):
        builder = asx.RecordBuilder(tick_file, 0)
        with tick_file.path.open(newline="") as fh:
            for line in fh:
                expected[tick_file.symbol].append(builder.build(line)["sequence_number"])
    return expected


def _stored_rows(settings) -> int:
    table = tables.load_table(tables.catalog(settings), settings.table_identifier("trades"))
    snapshot = table.current_snapshot() if table else None
    return int(snapshot.summary.additional_properties.get("total-records", 0)) if snapshot else 0


def test_a_client_joining_mid_day_gets_every_tick_once_in_sequence_order(live):
    procs, folder, settings = live
    expected = _day_trades(folder)
    total = sum(len(v) for v in expected.values())
    url = _start_api(procs)
    feed = _start_feed(procs, folder, "--speed", "1500", "--max-idle", "0.2")
    procs.start("ingest", "feed", feed, "--channels", "trades", "--until-end")
    procs.start("stream", "run", "--tables", "trades")

    deadline = time.monotonic() + 120
    while (stored := _stored_rows(settings)) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 0 < stored < total, f"the client must join mid-day: part stored, part still to come\n{procs.report()}"

    start = dt.datetime(2014, 3, 10, tzinfo=SYDNEY).isoformat()
    received: dict[str, list[int]] = defaultdict(list)
    ws_url = url.replace("http", "ws") + f"/v1/stream/trades?symbols={','.join(expected)}&from={start}"
    with connect(ws_url.replace("+", "%2B"), additional_headers={"X-API-Key": DEV_API_KEY}) as ws:
        while sum(len(v) for v in received.values()) < total:
            tick = json.loads(ws.recv(timeout=120))
            received[tick["symbol"]].append(tick["sequence_number"])
        with pytest.raises(TimeoutError):
            ws.recv(timeout=2)  # and nothing after the last tick: no duplicate arrives late
    assert received == expected, "every tick of the day, once each, in sequence order per symbol"

    # the feed → Kafka → Iceberg → REST path: once the stream has committed the day, the API serves all of it
    deadline = time.monotonic() + 120
    while _stored_rows(settings) < total and time.monotonic() < deadline:
        time.sleep(0.3)
    for symbol, numbers in expected.items():
        rows = httpx.post(f"{url}/v1/trades/query", json={"symbols": [symbol]}, headers={"X-API-Key": DEV_API_KEY},
                          timeout=60).raise_for_status().json()["data"]
        assert sorted(r["sequence_number"] for r in rows) == numbers
        assert {r["source_id"] for r in rows} == {f"feed:{feed}"}

    symbol = sorted(expected)[0]
    tail = subprocess.run([str(Path(sys.executable).with_name("k2-query")), "tail", symbol, "--from", "2014-03-10",
                           "--count", "3", "--url", url], capture_output=True, text=True, timeout=60, env=procs.env)
    lines = tail.stdout.splitlines()
    assert tail.returncode == 0 and len(lines) == 3, tail.stderr
    assert [line.split()[3] for line in lines] == ["#1", "#2", "#3"] and all(symbol in line for line in lines)


def test_a_client_that_does_not_read_is_disconnected_with_the_reason(live):
    procs, folder, _ = live
    procs.env["K2_STREAM_BUFFER"] = "50"
    url = _start_api(procs)
    feed = _start_feed(procs, folder, "--speed", "0")
    # max_queue=1: the client stops reading its socket, as a stalled consumer does
    ws = connect(url.replace("http", "ws") + "/v1/stream/quotes", additional_headers={"X-API-Key": DEV_API_KEY},
                 max_queue=1)
    try:
        deadline = time.monotonic() + 60
        while 'k2_stream_subscribers{kind="quotes"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "never subscribed"
            time.sleep(0.2)
        procs.start("ingest", "feed", feed, "--until-end")
        cut = 'k2_stream_disconnects_total{kind="quotes",reason="slow_consumer"} 1.0'
        deadline = time.monotonic() + 120
        while cut not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the stalled client was never cut off"
            time.sleep(0.5)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in ws:  # what was sent before the cut, then the close frame with the reason
                pass
        assert closed.value.rcvd.code == 1013 and "slow_consumer" in closed.value.rcvd.reason
    finally:
        ws.close()


def test_a_bad_key_is_refused_and_the_key_may_come_first_in_band(live):
    procs, _, _ = live
    url = _start_api(procs).replace("http", "ws") + "/v1/stream/trades?symbols=BHP"
    with connect(url, additional_headers={"X-API-Key": "wrong"}) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason.startswith("unauthorized")
    with connect(url) as ws:
        ws.send(json.dumps({"api_key": DEV_API_KEY}))
        with pytest.raises(TimeoutError):
            ws.recv(timeout=2)  # accepted: waiting for ticks, not closed
