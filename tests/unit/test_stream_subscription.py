"""A WebSocket subscriber's buffer (k2.api.hub.Subscription): a subscriber that stops reading is
given up on once `buffer` ticks wait for it, holds no more than that, and costs the subscribers
that keep reading nothing: each still gets every tick, in order, from the same pushes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from k2.api.hub import LiveTick, Subscription
from k2.observability import REGISTRY

BUFFER = 4


def tick(sequence: int) -> LiveTick:
    return LiveTick(symbol="BHP", exchange="ASX", exchange_date=16_140, sequence_number=sequence,
                    partition=("market.trades.asx", 0), offset=sequence, json=f'{{"sequence_number":{sequence}}}')


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def drained(sub: Subscription) -> list[int]:
    got = []
    while not sub.queue.empty():
        got.append(sub.queue.get_nowait().sequence_number)
    return got


def disconnects() -> float:
    return REGISTRY.get_sample_value("k2_stream_disconnects_total",
                                     {"kind": "trades", "reason": "slow_consumer"}) or 0.0


def test_a_subscriber_that_stops_reading_is_given_up_on_and_the_others_get_every_tick(
        loop: asyncio.AbstractEventLoop) -> None:
    slow = Subscription("trades", frozenset(), buffer=BUFFER, loop=loop)
    readers = [Subscription("trades", frozenset(), buffer=BUFFER, loop=loop) for _ in range(2)]
    before = disconnects()

    received: list[list[int]] = [[] for _ in readers]
    for sequence in range(1, 101):
        slow.push([tick(sequence)])
        for reader, got in zip(readers, received, strict=True):
            reader.push([tick(sequence)])
            got.extend(drained(reader))

    assert slow.overflowed.is_set()
    assert drained(slow) == list(range(1, BUFFER + 1))  # what it held when given up on: no more
    assert received == [list(range(1, 101))] * len(readers)
    assert not any(reader.overflowed.is_set() for reader in readers)
    assert disconnects() - before == 1  # counted once, not once per tick it missed


def test_a_batch_larger_than_the_buffer_overflows_at_once_holding_only_the_buffer(
        loop: asyncio.AbstractEventLoop) -> None:
    sub = Subscription("trades", frozenset(), buffer=BUFFER, loop=loop)
    before = disconnects()

    sub.push([tick(sequence) for sequence in range(1, 1_001)])
    sub.push([tick(1_001)])

    assert sub.overflowed.is_set()
    assert drained(sub) == list(range(1, BUFFER + 1))
    assert disconnects() - before == 1
