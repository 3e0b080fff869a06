"""`k2 feed serve` → `k2 ingest feed` → Kafka on the real Kafka + registry: every tick exactly as
file ingestion makes it, malformed messages dead-lettered with the reason, reconnection with
resubscription after the feed dies, and SIGTERM flushing what was received."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from k2 import topics
from k2.dlq import FileDeadLetters
from k2.ingest.feed import FeedIngest, ingest_feed
from k2.ingest.pipeline import register_schemas
from k2.ingest.producer import TickProducer
from k2.observability import FEED_RECONNECTS, REGISTRY
from k2.quality import SequenceGapHalt
from k2.schemas.registry import client
from k2.schemas.wire import AvroDecoder
from k2.sources.feed import K2FeedAdapter, encode_tick
from k2.stack.base import free_port
from k2_synthetic import generate

pytestmark = pytest.mark.integration
K2 = [str(Path(sys.executable).with_name("k2"))]



class Simulator:
    """A real `k2 feed serve` process."""

    def __init__(self, folder: Path, port: int, *args: str) -> None:
        self.proc = subprocess.Popen([*K2, "feed", "serve", str(folder), "--port", str(port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("k2 feed: ws://"), f"simulator did not start: {line!r}"
        self.url = line.split(": ", 1)[1].strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def folder(tmp_path):
    return generate(tmp_path / "ticks", symbols=2, days=1, seed=11)


@pytest.fixture
def simulators():
    started: list[Simulator] = []
    yield lambda *a: started.append(Simulator(*a)) or started[-1]
    for sim in started:
        if sim.proc.poll() is None:
            sim.kill()


def _stored(settings, drain) -> list[tuple[tuple, dict]]:
    decoder = AvroDecoder(client(settings.registry_url))
    out = []
    for kind in ("trades", "quotes"):
        for msg in drain(settings.kafka_bootstrap, settings.topic(kind)):
            _, record = decoder.decode(msg.value())
            assert msg.key().decode() == record["symbol"]
            out.append(((kind, record["symbol"], record["exchange_date"], record["sequence_number"]), record))
    return out


def _same(record: dict, expected: dict) -> bool:
    skip = {"ingest_timestamp", "source_id"}
    return {k: v for k, v in record.items() if k not in skip} == {k: v for k, v in expected.items() if k not in skip}


def test_feed_ticks_reach_kafka_exactly_as_from_the_files(folder, simulators, embedded_settings, drain, tmp_path,
                                                           file_records):
    sim = simulators(folder, free_port(), "--speed", "0", "--malformed-every", "97")
    dlq = tmp_path / "dlq.jsonl"
    summary = ingest_feed(sim.url, embedded_settings, until_end=True, dlq_file=dlq)

    expected = file_records(folder)
    stored = _stored(embedded_settings, drain)
    assert len(stored) == len(expected) == summary.produced_total
    assert all(_same(record, expected[key]) for key, record in stored)
    assert {record["source_id"] for _, record in stored} == {f"feed:{sim.url}"}
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert len(letters) == len(expected) // 97 == summary.rejected_total
    assert {(x["stage"], x["reason"], x["source"]) for x in letters} == {("ingest", "bad_number", f"feed:{sim.url}")}
    assert all("not-a-price" in x["line"] for x in letters)
    assert summary.balanced and summary.rows_read == len(expected) + len(letters)


def test_reconnects_and_resubscribes_after_the_feed_dies(folder, simulators, embedded_settings, drain, tmp_path,
                                                         file_records):
    port = free_port()
    first = simulators(folder, port, "--speed", "3000", "--max-idle", "0.2")
    reconnects = FEED_RECONNECTS._value.get()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(summary=ingest_feed(
        first.url, embedded_settings, channels=["trades"], until_end=True, dlq_file=tmp_path / "dlq.jsonl")))
    worker.start()
    deadline = time.monotonic() + 120
    while not _topic_has(embedded_settings, drain, 50) and time.monotonic() < deadline:
        time.sleep(0.3)
    first.kill()  # mid-day: the feed dies with ticks still to come
    time.sleep(1.0)  # refused connections meanwhile are retried too
    second = simulators(folder, port, "--speed", "0")  # the venue is back and replays the day
    worker.join(180)
    assert not worker.is_alive() and "summary" in result, "ingest did not finish after the feed came back"
    assert FEED_RECONNECTS._value.get() > reconnects
    assert second.proc.poll() is None
    expected = {k for k in file_records(folder) if k[0] == "trades"}
    stored = [key for key, _ in _stored(embedded_settings, drain)]
    assert set(stored) == expected, "every trade of the day, after resubscribing"
    assert len(stored) > len(expected), "the replayed day arrived again (the stream drops those copies)"


def _topic_has(settings, drain, count: int) -> bool:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe"})
    try:
        topic = settings.topic("trades")
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return False
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.partitions) >= count
    except KafkaException:  # a topic just created may have no leader yet: not there yet, ask again
        return False
    finally:
        consumer.close()


def test_sigterm_flushes_what_was_received(folder, simulators, embedded_settings, drain, file_records):
    sim = simulators(folder, free_port(), "--speed", "2000", "--max-idle", "0.2")
    env = {**os.environ, **embedded_settings.to_env(), "K2_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([*K2, "ingest", "feed", sim.url], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _topic_has(embedded_settings, drain, 20) and time.monotonic() < deadline:
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = next(json.loads(line) for line in err.splitlines() if '"ingest.summary"' in line)
    assert summary["interrupted"] and summary["balanced"]
    stored = _stored(embedded_settings, drain)
    assert 0 < len(stored) == summary["produced"] < len(file_records(folder)), "stopped mid-day, nothing lost"


def _bhp_trades_ingest(settings) -> FeedIngest:
    """A feed ingest on the real Kafka + registry, handed frames by the test."""
    topics.ensure_pipeline_topics(settings, ("trades",))
    return FeedIngest("ws://test", settings, channels=["trades"], symbols=["BHP"], adapter=K2FeedAdapter(),
                      dlq=FileDeadLetters(Path(settings.dlq_path)), producer=TickProducer(settings.kafka_bootstrap),
                      encoders=register_schemas(settings, ("trades",)))


def _bhp_trades(folder: Path, file_records) -> list[dict]:
    return sorted((r for k, r in file_records(folder).items() if k[0] == "trades" and k[1] == "BHP"),
                  key=lambda r: r["sequence_number"])


def test_sequence_gaps_follow_the_policy(folder, embedded_settings, file_records):
    settings = embedded_settings.model_copy(update={"gap_alert": 3, "gap_halt": 10})
    records = _bhp_trades(folder, file_records)[:40]
    feed = _bhp_trades_ingest(settings)
    sent = [records[i] for i in (4, 5, 7, 12)]  # baseline at 5, then a gap of 1 (warning), of 4 (alert)
    for record in sent:
        feed.handle(json.dumps(encode_tick("trades", dict(record))))
    assert feed.detector.counts == {"warning": 1, "alert": 1}
    with pytest.raises(SequenceGapHalt):
        feed.handle(json.dumps(encode_tick("trades", dict(records[30]))))  # 17 missing > halt 10
    feed.producer.flush()
    assert sum(feed.producer.delivered.values()) == len(sent), "the halting tick is not produced"


def test_the_feed_lag_is_the_time_from_the_servers_sent_stamp_to_receipt(folder, embedded_settings, file_records):
    """k2_feed_lag_seconds: how long the latest tick took from the server's `sent` to this process,
    the delay a venue's backlog or a slow network adds (exchange time says nothing of it)."""
    feed = _bhp_trades_ingest(embedded_settings)
    first, second, third = _bhp_trades(folder, file_records)[:3]

    feed.handle(json.dumps(encode_tick("trades", dict(first), time.time() - 5.0)))  # held up 5 s on the way
    assert 5.0 <= _feed_lag() < 6.5
    feed.handle(json.dumps(encode_tick("trades", dict(second), time.time())))
    fresh = _feed_lag()
    assert 0.0 <= fresh < 1.0, "a fresh tick"
    feed.handle(json.dumps(encode_tick("trades", dict(third))))  # a server that does not say when it sent
    assert _feed_lag() == fresh, "no `sent`: the lag stays the last one measured"
    feed.producer.flush()
    assert sum(feed.producer.delivered.values()) == 3


def test_a_tick_of_another_exchange_or_unfit_for_its_own_goes_to_the_dlq(folder, embedded_settings, file_records):
    """The feed writes the pipeline's topics (Settings.exchange, asx here): a tick of another known
    exchange is refused as the stream refuses it (`wrong_exchange`), beside an unknown exchange and
    the symbol and date misfits, each counted (whatever the adapter, the check is the ingest's); the
    ticks around them are produced, so messages in = produced + rejected."""
    assert embedded_settings.exchange == "asx"
    feed = _bhp_trades_ingest(embedded_settings)
    first, second = (encode_tick("trades", dict(r)) for r in _bhp_trades(folder, file_records)[:2])
    unfit = [("wrong_exchange", {**first, "symbol": "AAPL", "exchange": "NASDAQ"}),
             # a tick that fits CRYPTO (its UTC date), just not this pipeline
             ("wrong_exchange", {**first, "symbol": "BTC-USD", "exchange": "CRYPTO", "date": first["time"][:10]}),
             ("unknown_exchange", {**first, "exchange": "LSE"}),
             ("bad_symbol", {**first, "symbol": "BTC-USD"}),
             ("wrong_exchange_date", {**first, "date": "2014-03-09"})]  # not Sydney's date of that instant
    reasons = sorted(reason for reason, _ in unfit)
    before = _rejected_at_ingest(reasons)

    for message in (first, *(m for _, m in unfit), second):
        feed.handle(json.dumps(message))
    feed.producer.flush()
    feed.dlq.flush()

    letters = [json.loads(line) for line in Path(embedded_settings.dlq_path).read_text().splitlines()]
    assert sorted(x["reason"] for x in letters) == reasons
    produced = sum(feed.producer.delivered.values())
    assert produced == 2 and feed.summary.rows_read == produced + feed.summary.rejected_total == 2 + len(unfit)
    wrong = sorted(x["detail"] for x in letters if x["reason"] == "wrong_exchange")
    assert [("CRYPTO" in d, "NASDAQ" in d, "ASX" in d) for d in wrong] == [(True, False, True), (False, True, True)]
    assert all(json.loads(x["line"])["seq"] == first["seq"] for x in letters), "the refused message itself"
    after = _rejected_at_ingest(reasons)
    assert {r: after[r] - before[r] for r in after} == {r: reasons.count(r) for r in reasons}


def _rejected_at_ingest(reasons: list[str]) -> dict[str, float]:
    return {r: REGISTRY.get_sample_value("k2_rows_rejected_total", {"stage": "ingest", "reason": r}) or 0.0
            for r in reasons}


def _feed_lag() -> float:
    value = REGISTRY.get_sample_value("k2_feed_lag_seconds")
    assert value is not None
    return value


# the simulator's side of the protocol (docs/feed-protocol.md) --------------------------------------
def _trades_folder(root: Path, folder: Path, offsets: list[int]) -> Path:
    """An ASX-format folder of BHP trades `offsets` exchange seconds after 10:00."""
    (root / "reference-data").mkdir(parents=True)
    (root / "trades").mkdir()
    (root / "reference-data" / "company_info.csv").write_text(
        (folder / "reference-data" / "company_info.csv").read_text())
    rows = [f"03/10/2014,{10 + s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}.000,36.7,100,0,," for s in offsets]
    (root / "trades" / "7078.csv").write_text("\n".join(rows) + "\n")
    return root


def _frames(ws, until, timeout: float = 30) -> list[dict]:
    """Frames read until `until(frames)` holds."""
    frames: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(frames):
        try:
            frames.append(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01))))
        except TimeoutError:
            raise AssertionError(f"timed out after {len(frames)} frames, the last {frames[-3:]}") from None
    return frames


def _sending_offsets(url: str, count: int) -> list[float]:
    """Seconds from the first trade's sending to each later one's, by the server's `sent` clock."""
    with connect(url) as ws:
        ws.send(json.dumps({"type": "subscribe", "channels": ["trades"]}))
        frames = _frames(ws, lambda got: sum(f["type"] == "trade" for f in got) == count)
    sent = [f["sent"] for f in frames if f["type"] == "trade"]
    return [s - sent[0] for s in sent[1:]]


def test_the_simulator_paces_ticks_by_exchange_time_divided_by_the_speed(folder, simulators, tmp_path):
    """--speed N: a tick is sent (gap in exchange time) / N after the previous one. The schedule is
    kept from the first tick, so a late wake-up on a loaded machine delays one tick, never the rest;
    a tick is never early, and the bands above allow a busy machine's delays."""
    offsets = [0, 2, 8, 10, 14]  # exchange seconds: gaps of 2, 6, 2 and 4
    paced = _trades_folder(tmp_path / "paced", folder, offsets)
    measured = {}
    for speed in (4, 16):
        sim = simulators(paced, free_port(), "--speed", str(speed), "--max-idle", "60")
        measured[speed] = _sending_offsets(sim.url, len(offsets))
        expected = [s / speed for s in offsets[1:]]
        assert all(e - 0.05 <= m <= e + 0.75 for m, e in zip(measured[speed], expected, strict=True)), \
            f"speed {speed}: sent at {measured[speed]}, the exchange times say {expected}"
    slow, fast = measured[4], measured[16]
    assert slow[-1] >= 3.45 and fast[-1] < slow[-1] / 2, "four times the speed: the same ticks in a quarter of the time"
    gaps = [b - a for a, b in zip([0.0, *slow], slow, strict=False)]
    assert max(gaps) == gaps[1], f"the longest exchange gap is the longest wait: {gaps}"


def _ticks_after(frames: list[dict], reply: str) -> list[dict]:
    """The ticks among `frames` that came after the server's `reply` (ticks queued before the
    command was read may still precede it); none before the reply came."""
    at = next((i for i, f in enumerate(frames) if f["type"] == reply), len(frames))
    return [f for f in frames[at + 1:] if f["type"] in ("trade", "quote")]


def _streams(ticks: list[dict]) -> set[tuple[str, str]]:
    return {(f["type"], f["symbol"]) for f in ticks}


def _after_reply(ws, reply: str, count: int) -> list[dict]:
    """Frames until `count` ticks have come after `reply`."""
    return _frames(ws, lambda got: len(_ticks_after(got, reply)) >= count)


def test_an_unsubscribed_symbol_or_channel_stops_while_the_rest_flows(folder, simulators):
    """docs/feed-protocol.md: unsubscribe answers with the resulting sets; from that answer on no
    tick of what was unsubscribed arrives, and the rest goes on. An unsubscribe names what stops:
    symbols on every channel, or channels of every symbol."""
    sim = simulators(folder, free_port(), "--speed", "500", "--max-idle", "0.02")
    with connect(sim.url) as ws:
        ws.send(json.dumps({"type": "subscribe", "symbols": ["BHP", "RIO"]}))
        both = {(t, s) for t in ("trade", "quote") for s in ("BHP", "RIO")}
        frames = _frames(ws, lambda got: _streams(_ticks_after(got, "subscribed")) == both)
        assert next(f for f in frames if f["type"] == "subscribed") == {
            "type": "subscribed", "channels": ["quotes", "trades"], "symbols": ["BHP", "RIO"]}

        ws.send(json.dumps({"type": "unsubscribe", "symbols": ["RIO"]}))
        after = _ticks_after(_after_reply(ws, "unsubscribed", 200), "unsubscribed")
        assert _streams(after) == {("trade", "BHP"), ("quote", "BHP")}, "RIO stopped, BHP goes on in both channels"

        ws.send(json.dumps({"type": "unsubscribe", "channels": ["quotes"]}))
        frames = _after_reply(ws, "unsubscribed", 50)
        assert next(f for f in frames if f["type"] == "unsubscribed") == {
            "type": "unsubscribed", "channels": ["trades"], "symbols": ["BHP"]}
        assert _streams(_ticks_after(frames, "unsubscribed")) == {("trade", "BHP")}

    with connect(sim.url) as ws:  # every symbol, then no quotes: the trades of every symbol go on
        ws.send(json.dumps({"type": "subscribe"}))
        ws.send(json.dumps({"type": "unsubscribe", "channels": ["quotes"]}))
        after = _ticks_after(_after_reply(ws, "unsubscribed", 300), "unsubscribed")
        assert _streams(after) == {("trade", "BHP"), ("trade", "RIO")}



def test_heartbeats_come_every_interval_before_during_and_after_the_ticks(folder, simulators, tmp_path):
    """docs/feed-protocol.md: `hello` says `heartbeat_seconds`, and a heartbeat follows every
    interval whether or not ticks flow, its `state` saying where the market is and `sent` how many
    ticks were sent so far (at --speed 0 the ticks flow for as long as this client takes to read them)."""
    ticks = _trades_folder(tmp_path / "day", folder, list(range(6000)))
    sim = simulators(ticks, free_port(), "--speed", "0", "--heartbeat", "0.05")
    with connect(sim.url) as ws:
        hello = json.loads(ws.recv(timeout=30))
        assert hello["type"] == "hello" and hello["heartbeat_seconds"] == 0.05
        started = time.monotonic()
        waiting = _frames(ws, lambda got: time.monotonic() - started > 1)  # idle: nobody subscribed yet
        assert {f["type"] for f in waiting} == {"heartbeat"}
        assert {(f["state"], f["sent"]) for f in waiting} == {("waiting", 0)}
        assert 10 <= len(waiting) <= 24, f"{len(waiting)} heartbeats in 1 s at one per 0.05 s"
        gaps = sorted(b["time"] - a["time"] for a, b in itertools.pairwise(waiting))
        assert 0.045 <= gaps[len(gaps) // 2] <= 0.1, f"heartbeat spacing {gaps}"

        ws.send(json.dumps({"type": "subscribe"}))
        frames = _frames(ws, lambda got: bool(got) and got[-1]["type"] == "end", timeout=120)
        received = 0
        for frame in frames:
            if frame["type"] == "trade":
                received += 1
            elif frame["type"] == "heartbeat":
                assert frame["state"] == "open" and frame["sent"] == received, "sent: the ticks sent so far"
        assert received == 6000 and any(f["type"] == "heartbeat" for f in frames), "heartbeats while ticks flow"
        ended = _frames(ws, lambda got: len(got) == 3)
        assert {(f["type"], f["state"], f["sent"]) for f in ended} == {("heartbeat", "ended", received)}


def _livez(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # the metrics server is not up yet
        return 0, ""


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _reconnects(port: int) -> float:
    return float(_metrics(port).split("\nk2_feed_reconnects_total ")[1].split()[0])


def _until_livez(port: int, status: int, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (answer := _livez(port))[0] != status:
        assert proc.poll() is None, f"k2 ingest feed exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"/livez never answered {status}: {answer}"
        time.sleep(0.1)
    return answer[1]


def test_livez_fails_while_the_feed_is_silent_and_recovers_when_it_speaks(folder, simulators, embedded_settings):
    """`k2 ingest feed`'s liveness is feed progress: healthy while heartbeats arrive, though no tick
    comes for longer than the bound (twice K2_FEED_STALE_SECONDS); failing, with the reason, once
    nothing has arrived for longer than that (the simulator frozen); healthy again when it speaks."""
    # pre-open at --speed 1: ticks a minute or so apart, heartbeats in between
    sim = simulators(folder, free_port(), "--speed", "1", "--max-idle", "60", "--heartbeat", "0.2")
    port = free_port()
    env = {**os.environ, **embedded_settings.to_env(), "K2_METRICS_PORT": str(port), "K2_FEED_STALE_SECONDS": "1"}
    proc = subprocess.Popen([*K2, "ingest", "feed", sim.url], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _until_livez(port, 200, proc)
        deadline = time.monotonic() + 60
        while "k2_feed_connected 1.0" not in _metrics(port):
            assert time.monotonic() < deadline, "the ingest never connected"
            time.sleep(0.1)
        reconnects = _reconnects(port)
        healthy_until = time.monotonic() + 4  # twice the bound, on heartbeats alone
        while time.monotonic() < healthy_until:
            assert _livez(port)[0] == 200, "heartbeats are feed progress"
            time.sleep(0.2)
        assert _reconnects(port) == reconnects, "heartbeats keep the connection from going stale"

        sim.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        reason = _until_livez(port, 503, proc, timeout=30)
        assert time.monotonic() - stopped >= 1.5, "failing before the bound"
        assert "last feed message" in reason and "limit 2s" in reason, reason

        sim.proc.send_signal(signal.SIGCONT)
        _until_livez(port, 200, proc)
    finally:
        sim.proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(30)



@pytest.fixture
def silent_feed():
    """A WebSocket server that accepts every connection and never sends a frame: a venue whose
    gateway is up while nothing behind it is."""
    from websockets.sync.server import serve

    def handler(ws) -> None:
        with contextlib.suppress(ConnectionClosed):
            for _ in ws:  # the client's subscribe frames go unanswered
                pass

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        server.shutdown()
    thread.join(10)


def test_livez_fails_on_a_feed_that_accepts_connections_and_says_nothing(silent_feed, embedded_settings):
    """Connecting is not progress: reconnecting to a silent feed must not keep /livez healthy
    (it did: each connect reset the clock of the last message, so the age never reached the bound)."""
    port = free_port()
    env = {**os.environ, **embedded_settings.to_env(), "K2_METRICS_PORT": str(port), "K2_FEED_STALE_SECONDS": "2"}
    proc = subprocess.Popen([*K2, "ingest", "feed", silent_feed], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _until_livez(port, 200, proc)
        reason = _until_livez(port, 503, proc, timeout=30)
        assert "last feed message" in reason, reason
        assert _reconnects(port) >= 1, "the ingest reconnected meanwhile, as a silent feed asks"
    finally:
        proc.terminate()
        proc.wait(30)
