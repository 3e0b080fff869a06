"""Which failures are waited for (a dependency not there or not ready yet) and which are errors."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from k2.faults import Transient, transient_dependency

# What calls such as get_watermark_offsets or list_offsets raise while a restarted broker elects
# partition leaders and reloads groups. confluent-kafka builds these exceptions from the bare code,
# without the broker's retriable flag, so KafkaError.retriable() says False for every one of them.
BROKER_NOT_READY = [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
                    KafkaError.NETWORK_EXCEPTION, KafkaError.NOT_ENOUGH_REPLICAS,
                    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.KAFKA_STORAGE_ERROR,
                    KafkaError.OFFSET_NOT_AVAILABLE, KafkaError.FENCED_LEADER_EPOCH,
                    KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError.PREFERRED_LEADER_NOT_AVAILABLE]
CLIENT_NOT_CONNECTED = [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                        KafkaError._WAIT_COORD]
REFUSED = [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_CONFIG,
           KafkaError.UNKNOWN_TOPIC_OR_PART]


@pytest.mark.parametrize("code", BROKER_NOT_READY + CLIENT_NOT_CONNECTED)
def test_a_broker_away_or_not_ready_is_waited_for(code: int) -> None:
    error = KafkaException(KafkaError(code))
    assert transient_dependency(error) == "kafka"


@pytest.mark.parametrize("code", REFUSED)
def test_a_refusal_or_a_missing_topic_is_an_error_not_an_outage(code: int) -> None:
    assert transient_dependency(KafkaException(KafkaError(code))) is None


def test_a_declared_transient_names_its_dependency() -> None:
    assert transient_dependency(Transient("s3", "slow down")) == "s3"
    assert transient_dependency(ValueError("bad row")) is None
