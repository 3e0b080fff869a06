"""The API's tick hub on the real Kafka: an API that starts while the broker is away must not,
once the broker is back, push the topic's history to live subscribers as if it were new ticks.
Partitions there when the hub started are read from their end, however long the cluster took to
answer; what is produced afterwards reaches the subscriber."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest

from k2.api.hub import Subscription, TickHub
from k2.ingest.pipeline import ingest_files
from k2_synthetic import generate

pytestmark = pytest.mark.integration


@pytest.fixture
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _received(sub: Subscription, loop: asyncio.AbstractEventLoop) -> list:
    async def drain() -> list:
        ticks = []
        while not sub.queue.empty():
            ticks.append(sub.queue.get_nowait())
        return ticks
    return asyncio.run_coroutine_threadsafe(drain(), loop).result(10)


def test_a_hub_started_while_the_broker_is_away_pushes_only_new_ticks(tmp_path, embedded_settings, kafka,
                                                                     event_loop_thread):
    history = ingest_files(generate(tmp_path / "history", symbols=1, days=1, seed=3), embedded_settings)
    assert history.produced[embedded_settings.topic("trades")] > 0
    kafka.stop()
    hub = TickHub(embedded_settings, kinds=["trades"])
    sub = Subscription("trades", frozenset(), buffer=1_000_000, loop=event_loop_thread)
    try:
        hub.start()
        assert hub.wait_started(60), "the hub's first look at the cluster did not end"
        hub.subscribe(sub)
        kafka.start()
        deadline = time.monotonic() + 120
        while not hub.subscribe(sub) and time.monotonic() < deadline:  # no partition assigned yet
            time.sleep(0.5)
        assert hub.subscribe(sub), "the hub never read the topic after the broker came back"
        time.sleep(5)  # time for any history the hub wrongly reads to reach the subscriber
        assert _received(sub, event_loop_thread) == [], "history pushed as live ticks"

        later = generate(tmp_path / "later", symbols=1, days=1, seed=3, start=dt.date(2014, 3, 11))
        produced = ingest_files(later, embedded_settings).produced[embedded_settings.topic("trades")]
        ticks: list = []
        deadline = time.monotonic() + 60
        while len(ticks) < produced and time.monotonic() < deadline:
            ticks += _received(sub, event_loop_thread)
            time.sleep(0.2)
        assert len(ticks) == produced and {t.exchange_date for t in ticks} == {(dt.date(2014, 3, 11)
                                                                                - dt.date(1970, 1, 1)).days}
    finally:
        hub.close()
        kafka.start()  # no-op when it is back already
