"""The stream's micro-batch, filled a poll at a time: the same batches, offsets and sizes as
filling it one message at a time (the reference it replaced)."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2.stream.writer import Batch, TableWriter

pytestmark = pytest.mark.unit

messages = st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.binary(max_size=40))), max_size=200)


def _numbered(drawn: list[tuple[int, bytes | None]]) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, payload) with each partition's offsets ascending from 10."""
    next_offset: dict[int, int] = {}
    out = []
    for partition, payload in drawn:
        offset = next_offset.get(partition, 10)
        next_offset[partition] = offset + 1 + (offset % 3 == 0)  # gaps, as transaction markers leave
        out.append((partition, offset, payload))
    return out


def _add(batch: Batch, partition: int, offset: int, payload: bytes | None) -> None:
    """The reference: one message at a time, as the writer filled batches before `extend`."""
    batch.start.setdefault(partition, offset)
    batch.end[partition] = offset + 1
    batch.partitions.append(partition)
    batch.offsets.append(offset)
    batch.payloads.append(payload)
    if payload is not None:
        batch.nbytes += len(payload)


def _state(batch: Batch) -> tuple:
    return batch.partitions, batch.offsets, batch.payloads, batch.start, batch.end, batch.nbytes


@given(messages, st.integers(0, 200))
def test_extending_a_batch_equals_adding_each_message(drawn, cut):
    numbered = _numbered(drawn)
    one_by_one, at_once = Batch(), Batch()
    for partition, offset, payload in numbered:
        _add(one_by_one, partition, offset, payload)
    for part in (numbered[:cut], numbered[cut:]):
        at_once.extend([p for p, _, _ in part], [o for _, o, _ in part], [v for _, _, v in part])
    assert _state(at_once) == _state(one_by_one)
    assert _state(at_once.without({1, 2})) == _state(_only(numbered, {0, 3}))


def _only(numbered, partitions) -> Batch:
    batch = Batch()
    for partition, offset, payload in numbered:
        if partition in partitions:
            _add(batch, partition, offset, payload)
    return batch


@settings(max_examples=200)
@given(messages, st.integers(1, 30), st.integers(1, 200))
def test_a_poll_is_cut_into_the_batches_message_by_message_filling_made(drawn, batch_rows, batch_bytes):
    numbered = _numbered(drawn)
    expected, batch = [], Batch()
    for partition, offset, payload in numbered:
        _add(batch, partition, offset, payload)
        if batch.messages >= batch_rows or batch.nbytes >= batch_bytes:
            expected.append(batch.offsets)
            batch = Batch()
    writer = types.SimpleNamespace(settings=types.SimpleNamespace(batch_rows=batch_rows, batch_bytes=batch_bytes),
                                   batch=Batch())
    cut, payloads = [], [v for _, _, v in numbered]
    offsets = [o for _, o, _ in numbered]
    while payloads:
        room = TableWriter._room(writer, payloads)
        writer.batch.extend([0] * room, offsets[:room], payloads[:room])
        offsets, payloads = offsets[room:], payloads[room:]
        if writer.batch.messages >= batch_rows or writer.batch.nbytes >= batch_bytes:
            cut.append(writer.batch.offsets)
            writer.batch = Batch()
    assert cut == expected
