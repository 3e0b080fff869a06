"""`k2 feed serve`: a market simulator speaking the K2 feed protocol (docs/feed-protocol.md).

It replays ASX-format files (or synthetic ticks) in accelerated real time: every tick of every
file, merged by exchange time, numbered per (symbol, exchange date) exactly as file ingestion
numbers them, so a day taken from the feed and the same day loaded from its files are the same
records. The market opens when the first client subscribes, so a subscriber that is there from
the start sees every tick; one that joins later sees the ticks from then on, as on a real venue.

Pacing: `speed` exchange seconds per wall second, with waits capped at `max_idle` wall seconds
(nights and lunch breaks pass quickly). Speed 0 sends as fast as the slowest subscriber reads;
at any other speed a subscriber whose buffer fills is disconnected with the reason, because a
market does not wait for its slowest reader.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from k2.settings import TableKind
from k2.sources import asx
from k2.sources.feed import CHANNELS, PROTOCOL, control, encode_tick

log = structlog.get_logger("k2.feed")
logging.getLogger("websockets").setLevel(logging.WARNING)  # its per-connection INFO lines are not JSON
SLOW_CONSUMER = 1013  # "try again later": the close code vendors use for a reader that fell behind


def ticks(root: Path) -> Iterator[tuple[TableKind, dict]]:
    """Every accepted record of an ASX-format folder, merged across files by exchange time."""

    def one_file(tick_file: asx.TickFile) -> Iterator[tuple[int, TableKind, dict]]:
        builder = asx.RecordBuilder(tick_file, 0)
        with tick_file.path.open(newline="") as fh:
            for line in fh:
                try:
                    record = builder.build(line)
                except asx.RowError:
                    continue  # the simulator serves the market, not the file's typos
                yield record["exchange_timestamp"], tick_file.kind, record

    files = asx.discover(root, kinds=("trades", "quotes"))
    for _, kind, record in heapq.merge(*(one_file(f) for f in files), key=lambda item: item[0]):
        del record["ingest_timestamp"], record["source_id"]  # the receiver's to say
        yield kind, record


@dataclass(eq=False)
class Subscriber:
    ws: ServerConnection
    buffer: int
    channels: set[str] = field(default_factory=set)
    symbols: set[str] = field(default_factory=set)  # "*": every symbol
    queue: asyncio.Queue[str] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.buffer)

    def wants(self, channel: str, symbol: str) -> bool:
        return channel in self.channels and ("*" in self.symbols or symbol in self.symbols)


@dataclass
class Market:
    events: Iterator[tuple[TableKind, dict]]
    exchange: str
    symbols: list[str]
    speed: float = 1.0
    max_idle: float = 1.0
    heartbeat: float = 1.0
    buffer: int = 10_000
    malformed_every: int = 0  # fault injection: a corrupted copy before every Nth tick
    subscribers: set[Subscriber] = field(default_factory=set)
    closing: set[asyncio.Task] = field(default_factory=set)  # the loop keeps only weak references to tasks
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    sent: int = 0

    # connections ------------------------------------------------------------------------
    async def handle(self, ws: ServerConnection) -> None:
        sub = Subscriber(ws, self.buffer)
        await ws.send(control("hello", protocol=PROTOCOL, exchange=self.exchange, channels=list(CHANNELS),
                              symbols=self.symbols, heartbeat_seconds=self.heartbeat))
        writer = asyncio.create_task(self._write(sub))
        self.subscribers.add(sub)
        try:
            async for frame in ws:
                self._command(sub, frame)
        except ConnectionClosed:
            pass
        finally:
            self.subscribers.discard(sub)
            writer.cancel()

    def _command(self, sub: Subscriber, frame: str | bytes) -> None:
        try:
            message = json.loads(frame)
            op = message["type"]
            channels = set(message.get("channels") or CHANNELS)
            symbols = set(message.get("symbols") or ["*"])
            if op not in ("subscribe", "unsubscribe") or not channels <= set(CHANNELS) \
                    or not all(isinstance(s, str) for s in symbols):
                raise ValueError(f"expected subscribe/unsubscribe with channels among {list(CHANNELS)} "
                                 "and a list of symbols")
        except (ValueError, KeyError, TypeError) as exc:
            self._offer(sub, control("error", reason="bad_request", detail=str(exc)))
            return
        if op == "subscribe":
            sub.channels |= channels
            sub.symbols |= symbols
            self.opened.set()
        elif not message.get("channels") and not message.get("symbols"):
            sub.channels.clear()
            sub.symbols.clear()
        else:
            # An unsubscribe stops what it names and leaves the rest: `{"symbols": ["RIO"]}` used to
            # take every channel away too (its default), so the other symbols stopped with RIO.
            sub.channels -= channels if message.get("channels") else set()
            sub.symbols -= symbols if message.get("symbols") else set()
        self._offer(sub, control(op + "d", channels=sorted(sub.channels), symbols=sorted(sub.symbols)))
        if self.ended and op == "subscribe":
            self._offer(sub, control("end"))

    async def _write(self, sub: Subscriber) -> None:
        try:
            while True:
                await sub.ws.send(await sub.queue.get())
        except ConnectionClosed:
            pass

    def _offer(self, sub: Subscriber, frame: str) -> bool:
        """Queue a frame; a full buffer disconnects the subscriber (never blocks the market)."""
        try:
            sub.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            log.warning("feed.slow_consumer", remote=str(sub.ws.remote_address), buffer=self.buffer)
            self.subscribers.discard(sub)
            task = asyncio.create_task(sub.ws.close(SLOW_CONSUMER, f"slow consumer: {self.buffer} messages buffered"))
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)
            return False

    # the market ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Replay every tick, then say so; heartbeats go on meanwhile and after."""
        await self.opened.wait()
        log.info("feed.open", exchange=self.exchange, speed=self.speed)
        loop = asyncio.get_running_loop()
        base_wall, base_ts = loop.time(), None
        count = itertools.count(1)
        for kind, record in self.events:
            ts = record["exchange_timestamp"] / 1e6
            if self.speed > 0:
                base_ts = ts if base_ts is None else base_ts
                wait = base_wall + (ts - base_ts) / self.speed - loop.time()
                if wait > self.max_idle:
                    base_wall -= wait - self.max_idle
                    wait = self.max_idle
                await asyncio.sleep(max(wait, 0))
            n = next(count)
            if self.malformed_every and n % self.malformed_every == 0:
                await self._broadcast(kind, record["symbol"], self._corrupt(kind, record))
            await self._broadcast(kind, record["symbol"], json.dumps(encode_tick(kind, record, time.time())))
            self.sent += 1
            # Heartbeats and writers run here, between ticks, once `sent` counts the tick just queued
            # (a heartbeat run inside the broadcast said one tick fewer than its reader had).
            await asyncio.sleep(0)
        self.ended = True
        log.info("feed.end", ticks=self.sent)
        for sub in list(self.subscribers):
            if sub.channels:
                self._offer(sub, control("end"))

    @staticmethod
    def _corrupt(kind: TableKind, record: dict) -> str:
        message = encode_tick(kind, record, time.time())
        message["price" if kind == "trades" else "bid"] = "not-a-price"
        return json.dumps(message)

    async def _broadcast(self, kind: str, symbol: str, frame: str) -> None:
        for sub in list(self.subscribers):
            if not sub.wants(kind, symbol):
                continue
            if self.speed == 0:
                await sub.queue.put(frame)  # as fast as the slowest reader
            else:
                self._offer(sub, frame)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            state = "ended" if self.ended else "open" if self.opened.is_set() else "waiting"
            frame = control("heartbeat", time=time.time(), state=state, sent=self.sent)
            for sub in list(self.subscribers):
                if sub.queue.qsize() < self.buffer:  # a heartbeat never pushes anyone out
                    sub.queue.put_nowait(frame)


async def serve_market(market: Market, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    # compression off: ticks are small, and deflate per frame costs more than it saves
    async with serve(market.handle, host, port, compression=None, ping_interval=20, ping_timeout=20) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        log.info("feed.listening", url=f"ws://{host}:{bound}", exchange=market.exchange, symbols=market.symbols)
        print(f"k2 feed: ws://{host}:{bound}", flush=True)
        if ready is not None:
            ready.set()
        heartbeats = asyncio.create_task(market.heartbeats())
        await market.run()
        await heartbeats  # keep serving heartbeats and late subscribers after the end


def market_for(root: Path, **options) -> Market:
    symbols = sorted(asx.read_company_symbols(root).values())
    return Market(ticks(root), asx.EXCHANGE, symbols, **options)
