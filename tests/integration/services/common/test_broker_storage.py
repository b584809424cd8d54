"""The embedded broker's S3 storage repaired before it starts (against a real s3rver)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import structlog

from services.common.broker_storage import CLUSTER, batch_name
from services.common.kafka import EmbeddedBroker, ensure_topics
from services.common.s3 import S3
from tests.conftest import unique
from tests.integration.services.common.test_kafka import _produce, _read


@pytest.fixture
def s3(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)  # the broker's child process reads AWS_* from here
    with S3.from_env("tansu") as client:
        yield client


def _partition(topic: str) -> str:
    return f"clusters/{CLUSTER}/topics/{topic}/partitions/0000000000/"


async def _stored(topic: str, values: range, per_batch: int) -> EmbeddedBroker:
    """A broker on S3 that stored ``values`` in batches of ``per_batch``, stopped."""
    broker = EmbeddedBroker(storage="s3://tansu/")
    await asyncio.to_thread(broker.start)
    try:
        await ensure_topics(broker.bootstrap, [topic], partitions=1)
        await _produce(broker.bootstrap, topic, values, per_batch=per_batch)
    finally:
        broker.stop()
    return broker


def _set_watermark(s3: S3, topic: str, high: int) -> None:
    body = json.dumps({"low": None, "high": high, "timestamps": None}).encode()
    s3.put(_partition(topic) + "watermark.json", body)


async def test_a_broker_back_behind_its_batches_keeps_them_and_numbers_on_after_them(
    s3: S3,
) -> None:
    """Killed after writing batches and before their watermark: the batches past it were
    acknowledged. Without the repair the broker numbered new records from 10 over them."""
    topic = unique("behind")
    first = await _stored(topic, range(30), per_batch=10)
    _set_watermark(s3, topic, 10)

    second = EmbeddedBroker(port=first.port, storage="s3://tansu/")
    with structlog.testing.capture_logs() as logged:
        await asyncio.to_thread(second.start)
    try:
        assert await _produce(second.bootstrap, topic, range(30, 55), 7) == list(range(30, 55))
        assert await _read(second.bootstrap, topic, 55) == [b"v%d" % i for i in range(55)]
    finally:
        second.stop()
    [repaired] = [e for e in logged if e["event"] == "broker_storage_repaired"]
    assert repaired["watermark_was"] == 10
    assert repaired["watermark"] == 30
    assert repaired["batches_kept_past_watermark"] == 2


async def test_batches_of_an_earlier_life_past_a_break_are_not_read_among_new_ones(
    s3: S3,
) -> None:
    """Batches 0-9, 10-19 and 20-29 stored, the watermark back at 10 and batch 10 gone: batch
    20 is of an earlier life. Without the repair the new records, numbered from 10 in other
    batches, were read with it: old records again, new ones skipped."""
    topic = unique("stale")
    first = await _stored(topic, range(30), per_batch=10)
    _set_watermark(s3, topic, 10)
    s3.delete(_partition(topic) + "records/" + batch_name(10))

    second = EmbeddedBroker(port=first.port, storage="s3://tansu/")
    with structlog.testing.capture_logs() as logged:
        await asyncio.to_thread(second.start)
    try:
        assert await _produce(second.bootstrap, topic, range(30, 55), 7) == list(range(10, 35))
        expected = [b"v%d" % i for i in [*range(10), *range(30, 55)]]
        assert await _read(second.bootstrap, topic, 35) == expected
    finally:
        second.stop()
    [repaired] = [e for e in logged if e["event"] == "broker_storage_repaired"]
    assert (repaired["stale_deleted"], repaired["stale_records"]) == (1, 10)


async def test_an_empty_batch_below_the_watermark_no_longer_stops_every_read(s3: S3) -> None:
    """An S3 write cut short left batch 10 empty under a watermark that covers it: Tansu
    failed every fetch that reached it. Its records are gone; the rest is read."""
    topic = unique("empty")
    first = await _stored(topic, range(30), per_batch=10)
    s3.put(_partition(topic) + "records/" + batch_name(10), b"")

    second = EmbeddedBroker(port=first.port, storage="s3://tansu/")
    with structlog.testing.capture_logs() as logged:
        await asyncio.to_thread(second.start)
    try:
        expected = [b"v%d" % i for i in [*range(10), *range(20, 30)]]
        assert await _read(second.bootstrap, topic, 20) == expected
        assert await _produce(second.bootstrap, topic, range(30, 35), 5) == list(range(30, 35))
    finally:
        second.stop()
    [repaired] = [e for e in logged if e["event"] == "broker_storage_repaired"]
    assert (repaired["broken_deleted"], repaired["broken_records"]) == ([10], 10)
