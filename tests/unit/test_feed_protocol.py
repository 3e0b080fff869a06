"""The K2 feed protocol: what the simulator sends decodes to exactly the records file ingestion
makes; every malformed message is refused with a reason; reconnect delays are jittered and bounded;
`/livez` reports a stalled workload."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest

from k2 import observability
from k2.feed.server import ticks
from k2.ingest.feed import backoff
from k2.sources import asx
from k2.sources.feed import Control, K2FeedAdapter, MalformedMessage, Tick, encode_tick
from k2.stack.base import free_port
from k2_synthetic import generate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("feed"), symbols=2, days=2, seed=7)


def test_simulator_ticks_decode_to_the_file_records_in_sequence_order(folder, file_records):
    adapter, decoded, first = K2FeedAdapter(), {}, []
    last_seq: dict[tuple, int] = defaultdict(int)
    for kind, record in ticks(folder):
        frame = json.dumps(encode_tick(kind, record, sent=1.0))
        [tick] = adapter.decode(frame)
        assert isinstance(tick, Tick) and tick.kind == kind and tick.sent == 1.0
        key = (kind, tick.record["symbol"], tick.record["exchange_date"])
        assert tick.record["sequence_number"] == last_seq[key] + 1, "per-symbol sequence numbers in order"
        last_seq[key] = tick.record["sequence_number"]
        first.append((kind, tick.record["symbol"]))
        decoded[(*key, tick.record["sequence_number"])] = tick.record
    expected = {key: {k: v for k, v in r.items() if k not in ("ingest_timestamp", "source_id")}
                for key, r in file_records(folder).items()}
    assert decoded == expected
    assert len(set(first[:200])) == 4, "files are merged by exchange time, not sent one after another"


TRADE = {"type": "trade", "symbol": "BHP", "exchange": "ASX", "date": "2014-03-10", "seq": 3,
         "time": "2014-03-09T23:00:01.5Z", "price": "36.70", "volume": 300, "qualifiers": "0", "venue": None,
         "buyer_id": None}


@pytest.mark.parametrize(("frame", "reason"), [
    ("{not json", "not_json"),
    ("[1, 2]", "not_an_object"),
    (json.dumps({"type": "bogus"}), "unknown_type"),
    (json.dumps({**TRADE, "price": "not-a-price"}), "bad_number"),
    (json.dumps({**TRADE, "price": 36.7}), "bad_field"),  # a float price would not be exact
    (json.dumps({**TRADE, "price": "-1"}), "negative_value"),
    (json.dumps({**TRADE, "volume": "300"}), "bad_field"),
    (json.dumps({**TRADE, "seq": 0}), "bad_sequence"),
    (json.dumps({**TRADE, "seq": True}), "bad_field"),
    (json.dumps({**TRADE, "time": "2014-03-09T23:00:01"}), "bad_time"),
    (json.dumps({k: v for k, v in TRADE.items() if k != "symbol"}), "bad_field"),
])
def test_malformed_messages_are_refused_with_a_reason(frame, reason):
    with pytest.raises(MalformedMessage) as caught:
        K2FeedAdapter().decode(frame)
    assert caught.value.reason == reason


def test_a_valid_trade_and_control_messages():
    [tick] = K2FeedAdapter().decode(json.dumps(TRADE))
    assert tick.record["price"] == asx.unscaled_bytes(36_700_000) and tick.record["volume"] == 300
    assert tick.record["exchange_timestamp"] == 1_394_406_001_500_000
    [beat] = K2FeedAdapter().decode(json.dumps({"type": "heartbeat", "time": 1.0}))
    assert isinstance(beat, Control) and beat.type == "heartbeat"
    crypto = {**TRADE, "symbol": "BTC-USD", "exchange": "CRYPTO", "date": "2014-03-09"}
    assert K2FeedAdapter().decode(json.dumps(crypto))[0].record["symbol"] == "BTC-USD"


def test_backoff_is_jittered_and_capped():
    delays = [backoff(attempt, base=0.5, cap=30) for attempt in range(1, 40) for _ in range(20)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(backoff(1, base=0.5, cap=30) for _ in range(200)) <= 1.0
    assert len({round(d, 6) for d in delays}) > len(delays) // 2, "jittered, not in step"



def test_livez_reports_a_stalled_workload():
    port = free_port()
    server = observability.serve_metrics(port, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/livez").status_code == 200
        state = {"ok": True}
        with observability.liveness(lambda: (state["ok"], "last feed message 99s ago")):
            assert httpx.get(f"{url}/livez").status_code == 200
            state["ok"] = False
            answer = httpx.get(f"{url}/livez")
            assert answer.status_code == 503 and "99s ago" in answer.text
        assert httpx.get(f"{url}/livez").status_code == 200
        assert "k2_feed_reconnects_total" in httpx.get(f"{url}/metrics").text
    finally:
        server.shutdown()
        server.server_close()
