"""`k2 ingest feed ws://HOST:PORT`: a live feed → Kafka, until stopped.

The connection is kept up: on any failure (refused, dropped, no message within
`feed_stale_seconds`) it reconnects with exponential backoff and full jitter, and subscribes
again. Ticks are checked against the gap policy per (symbol, exchange date); the first tick of a
key seen by this process is its baseline, since nothing before it can be known here (the stream
checks the stored day against its own watermark). Messages the adapter cannot read, and ticks that
do not fit the pipeline's exchange (`Exchange.misfit`, as the stream checks them: another exchange,
a symbol not of its shape, a date not the local date of the instant), go to the DLQ with the
reason, so counts in = produced + rejected. SIGTERM flushes the producer and the DLQ.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from k2 import exchanges, topics
from k2.dlq import DeadLetter, DeadLetterSink, open_sink
from k2.ingest.pipeline import IngestSummary, register_schemas
from k2.ingest.producer import TickProducer
from k2.observability import FEED_CONNECTED, FEED_LAG, FEED_LAST_MESSAGE, FEED_MESSAGES, FEED_RECONNECTS, liveness
from k2.quality import GapDetector
from k2.settings import Settings, TableKind
from k2.sources.feed import ADAPTERS, CHANNELS, Control, FeedAdapter, MalformedMessage, Tick
from k2.stopping import StopFlag

log = structlog.get_logger("k2.ingest.feed")
_POLL_SECONDS = 0.5  # how often the stop flag and staleness are looked at while the feed is quiet


class FeedStale(RuntimeError):
    """Nothing, not even a heartbeat, for longer than the settings allow."""


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)], so many clients never retry in step."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 16)))


@dataclass
class FeedState:
    last_message: float = 0.0  # monotonic clock
    connected_at: float = 0.0  # monotonic clock: a session is stale once both are old
    connected: bool = False
    ended: bool = False


class FeedIngest:
    def __init__(self, url: str, settings: Settings, *, channels: Sequence[str], symbols: Sequence[str],
                 adapter: FeedAdapter, dlq: DeadLetterSink, producer: TickProducer,
                 encoders: dict) -> None:
        self.url, self.settings = url, settings
        self.channels, self.symbols = list(channels), list(symbols)
        self.adapter, self.dlq, self.producer, self.encoders = adapter, dlq, producer, encoders
        self.exchange = exchanges.get(settings.exchange)  # it writes this exchange's topics: its ticks only
        self.detector = GapDetector("ingest", settings.gap_alert, settings.gap_halt)
        self.summary = IngestSummary()
        self.state = FeedState(last_message=time.monotonic())
        self.source_id = f"feed:{url}"

    def alive(self) -> tuple[bool, str]:
        """Liveness: the feed (or its heartbeats) made progress recently."""
        age = time.monotonic() - self.state.last_message
        limit = self.settings.feed_stale_seconds * 2  # one stale period to notice, one to reconnect
        return age <= limit, f"last feed message {age:.1f}s ago (limit {limit:.0f}s)"

    def run(self, flag: StopFlag, *, until_end: bool = False) -> None:
        attempt = 0
        while not flag.stop and not (until_end and self.state.ended):
            try:
                with connect(self.url, open_timeout=10, close_timeout=5, compression=None) as ws:
                    self._connected(ws)
                    attempt = 0
                    self._session(ws, flag, until_end)
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, FeedStale) as exc:
                if flag.stop:
                    break
                attempt += 1
                FEED_RECONNECTS.inc()
                delay = backoff(attempt)
                log.warning("feed.reconnecting", url=self.url, attempt=attempt, in_seconds=round(delay, 2),
                            error=f"{type(exc).__name__}: {exc}")
                deadline = time.monotonic() + delay
                while not flag.stop and time.monotonic() < deadline:
                    time.sleep(min(_POLL_SECONDS, deadline - time.monotonic()))
            finally:
                self.state.connected = False
                FEED_CONNECTED.set(0)

    def _connected(self, ws: ClientConnection) -> None:
        for frame in self.adapter.subscribe(self.channels, self.symbols):
            ws.send(frame)
        self.state.connected = True
        # Only the stale timer starts again: liveness waits for a message, as a feed that accepts
        # connections and says nothing kept /livez healthy by being reconnected to.
        self.state.connected_at = time.monotonic()
        FEED_CONNECTED.set(1)
        log.info("feed.connected", url=self.url, channels=self.channels, symbols=self.symbols)

    def _session(self, ws: ClientConnection, flag: StopFlag, until_end: bool) -> None:
        while not flag.stop:
            try:
                frame = ws.recv(timeout=_POLL_SECONDS)
            except TimeoutError:
                heard = max(self.state.last_message, self.state.connected_at)
                if time.monotonic() - heard > self.settings.feed_stale_seconds:
                    raise FeedStale(f"no message for {self.settings.feed_stale_seconds}s") from None
                self.producer.producer.poll(0)
                continue
            self.state.last_message = time.monotonic()
            FEED_LAST_MESSAGE.set(time.time())
            self.handle(frame)
            self.producer.producer.poll(0)  # delivery reports as they come, at a live feed's pace
            if until_end and self.state.ended:
                return

    def handle(self, frame: str | bytes) -> None:
        try:
            events = self.adapter.decode(frame)
        except MalformedMessage as exc:
            self._reject(exc.reason, str(exc), frame)
            return
        for event in events:
            if not isinstance(event, Tick):
                self._control(event)
            elif misfit := self.exchange.misfit(event.record["exchange"], event.record["symbol"],
                                                event.record["exchange_timestamp"], event.record["exchange_date"]):
                self._reject(misfit.reason, misfit.detail, frame)
            else:
                self._tick(event)

    def _reject(self, reason: str, detail: str, frame: str | bytes) -> None:
        self.summary.rows_read += 1
        self.summary.rejected[reason] += 1
        text = frame if isinstance(frame, str) else frame.decode(errors="replace")
        self.dlq.send(DeadLetter(stage="ingest", reason=reason, detail=detail, source=self.source_id,
                                 line=text[:64_000]))

    def _tick(self, tick: Tick) -> None:
        record = tick.record
        self.summary.rows_read += 1
        key = (record["symbol"], record["exchange_date"])
        if key not in self.detector.last_seen:
            self.detector.last_seen[key] = record["sequence_number"] - 1
            log.info("feed.baseline", symbol=key[0], exchange_date=key[1], first_sequence=record["sequence_number"])
        self.detector.observe(record["symbol"], record["exchange_date"], record["sequence_number"])
        record["ingest_timestamp"] = time.time_ns() // 1000
        record["source_id"] = self.source_id
        self.producer.produce(self.settings.topic(tick.kind), record["symbol"].encode(),
                              self.encoders[tick.kind].encode(record))
        FEED_MESSAGES.labels(tick.kind).inc()
        if tick.sent is not None:
            FEED_LAG.set(max(0.0, time.time() - tick.sent))

    def _control(self, event: Control) -> None:
        if event.type == "end":
            self.state.ended = True
            log.info("feed.end_of_data", url=self.url)
        elif event.type == "error":
            log.warning("feed.server_error", url=self.url, **{k: v for k, v in event.body.items() if k != "type"})


def ingest_feed(url: str, settings: Settings, *, channels: Sequence[str] = tuple(CHANNELS),
                symbols: Sequence[str] = ("*",),
                protocol: str = "k2", until_end: bool = False, dlq_file: Path | None = None,
                producer_config: dict | None = None) -> IngestSummary:
    """Run until SIGTERM/SIGINT (or, with `until_end`, until the feed says it has no more ticks)."""
    if not url.startswith(("ws://", "wss://")):
        raise InvalidURI(url, "expected ws:// or wss://")
    kinds: tuple[TableKind, ...] = tuple(CHANNELS[c] for c in channels)
    topics.ensure_pipeline_topics(settings, kinds)
    encoders = register_schemas(settings, kinds)
    producer = TickProducer(settings.kafka_bootstrap, producer_config)
    dlq = open_sink(settings, dlq_file, producer.producer)
    feed = FeedIngest(url, settings, channels=channels, symbols=symbols, adapter=ADAPTERS[protocol](), dlq=dlq,
                      producer=producer, encoders=encoders)
    started = time.perf_counter()
    with StopFlag("feed.stopping") as flag, liveness(feed.alive):
        try:
            feed.run(flag, until_end=until_end)
        finally:
            producer.flush()
            dlq.flush()
    summary = feed.summary
    summary.produced.update(producer.delivered)
    summary.seconds = time.perf_counter() - started
    summary.interrupted = flag.stop
    log.info("ingest.summary", source=url, rows_read=summary.rows_read, produced=summary.produced_total,
             rejected=summary.rejected_total, rejected_by_reason=dict(summary.rejected), balanced=summary.balanced,
             interrupted=summary.interrupted)
    return summary
