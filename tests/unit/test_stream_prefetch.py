"""The stream consumer's prefetch is bounded by its configuration, not by the backlog: librdkafka
keeps each fetched buffer while any of its messages is queued, so a consumer catching up fills
its buffers to the fetch sizes. With 64 MiB fetches (16 MiB per partition) a `k2 stream run`
catching up on 3.7M messages peaked at 1.6 GB against 0.4 GB on 0.37M (benchmarks/bench_scale.py);
the helm chart's stream limit is 2 GiB."""

from __future__ import annotations

import pytest

from k2.settings import Settings
from k2.stream.writer import PREFETCH, stream_consumer_config

pytestmark = pytest.mark.unit

MIB = 1024 * 1024


def test_a_stream_consumer_fetches_at_most_8_mib_at_once_and_1_mib_per_partition():
    config = stream_consumer_config(Settings(), "k2-stream-trades")
    assert config["fetch.max.bytes"] <= 8 * MIB
    assert config["max.partition.fetch.bytes"] <= 1 * MIB


def test_a_caller_may_still_override_the_prefetch():
    assert stream_consumer_config(Settings(), "g", {"fetch.max.bytes": 4 * MIB})["fetch.max.bytes"] == 4 * MIB
    assert set(PREFETCH) <= set(stream_consumer_config(Settings(), "g"))
