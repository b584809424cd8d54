from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid

import pytest
from aiokafka import TopicPartition

from services.common.kafka import (
    EmbeddedBroker,
    broker_reachable,
    create_consumer,
    create_producer,
    ensure_topics,
    read_topic,
)
from tests.conftest import unique


async def test_embedded_broker_round_trip(broker: EmbeddedBroker, topics: tuple[str, str]) -> None:
    topic = topics[0]
    producer = create_producer(broker.bootstrap)
    await producer.start()
    try:
        sent = [await producer.send_and_wait(topic, key=b"k", value=b"v%d" % i) for i in range(5)]
    finally:
        await producer.stop()
    assert len({m.partition for m in sent}) == 1  # one key, one partition, in order
    consumer = create_consumer(
        broker.bootstrap, group_id="round-trip", session_timeout_ms=2000, heartbeat_interval_ms=300
    )
    await consumer.start()
    try:
        consumer.subscribe([topic])
        values: list[bytes] = []
        for _ in range(100):
            fetched = await consumer.getmany(timeout_ms=200, max_records=100)
            values += [r.value for records in fetched.values() for r in records]
            if len(values) == 5:
                break
    finally:
        await consumer.stop()
    assert values == [b"v%d" % i for i in range(5)]


async def test_ensure_topics_creates_what_is_missing_and_leaves_what_exists(
    broker: EmbeddedBroker,
) -> None:
    first, second = f"t-{uuid.uuid4().hex}", f"t-{uuid.uuid4().hex}"
    await ensure_topics(broker.bootstrap, [first], partitions=3)
    await ensure_topics(broker.bootstrap, [first, second], partitions=5)
    producer = create_producer(broker.bootstrap)
    await producer.start()
    try:
        assert len(await producer.partitions_for(first)) == 3  # as it was created
        assert len(await producer.partitions_for(second)) == 5
    finally:
        await producer.stop()


async def test_reachability(broker: EmbeddedBroker) -> None:
    assert await broker_reachable(broker.bootstrap)
    stopped = EmbeddedBroker()
    assert not await broker_reachable(stopped.bootstrap, timeout_s=0.5)
    # a cluster with one broker down is still reachable, through any address it was given
    assert await broker_reachable(f"{stopped.bootstrap},{broker.bootstrap}", timeout_s=0.5)
    assert not await broker_reachable(f"{stopped.bootstrap}, {stopped.bootstrap}", timeout_s=0.5)


async def test_read_topic_reads_every_partition_to_its_end(
    broker: EmbeddedBroker, topics: tuple[str, str]
) -> None:
    topic = topics[0]
    assert await read_topic(broker.bootstrap, topic) == []  # empty
    producer = create_producer(broker.bootstrap)
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(
                topic, key=b"k%d" % i, value=b"v%d" % i, headers=[("h", b"%d" % i)]
            )
    finally:
        await producer.stop()
    records = await read_topic(broker.bootstrap, topic)
    assert sorted(int(r.value[1:]) for r in records) == list(range(30))
    assert all([(k, bytes(v)) for k, v in r.headers] == [("h", r.value[1:])] for r in records)
    assert await read_topic(broker.bootstrap, unique("missing")) == []


async def test_a_restarted_memory_broker_is_empty_on_the_same_port() -> None:
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        used = embedded.memory_bytes()
        assert used is not None
        assert used > 1_000_000
        await ensure_topics(embedded.bootstrap, ["t"], partitions=1)
        producer = create_producer(embedded.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait("t", value=b"before")
            await asyncio.to_thread(embedded.restart)
            assert await read_topic(embedded.bootstrap, "t") == []  # the topic is gone
            await ensure_topics(embedded.bootstrap, ["t"], partitions=1)
            # the same producer goes on, on the same port, from offset 0
            sent = await producer.send_and_wait("t", value=b"after")
            assert sent.offset == 0
        finally:
            await producer.stop()
        assert [r.value for r in await read_topic(embedded.bootstrap, "t")] == [b"after"]
    finally:
        embedded.stop()
    assert embedded.memory_bytes() is None


async def test_a_broker_that_dies_is_down_and_one_stopped_on_purpose_is_not() -> None:
    embedded = EmbeddedBroker()
    assert not embedded.down  # never started
    embedded.start()
    try:
        assert not embedded.down
        assert embedded.pid is not None
        os.kill(embedded.pid, signal.SIGKILL)
        for _ in range(100):
            if embedded.down:
                break
            await asyncio.sleep(0.05)
        assert embedded.down
        assert embedded.exit_code == -signal.SIGKILL
        embedded.restart()
        assert not embedded.down
    finally:
        embedded.stop()
    assert not embedded.down


def test_broker_stops_and_frees_its_port() -> None:
    embedded = EmbeddedBroker()
    embedded.start()
    embedded.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", embedded.port), timeout=0.5)


async def test_a_restarted_broker_on_s3_numbers_on_from_what_it_stored(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tansu reads a partition's watermark from S3 only when the partition is fetched: produced
    to first, it numbered from 0 and overwrote the stored batches (see load_watermarks)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)  # the broker's child process reads AWS_* from here
    topic = unique("durable")
    first = EmbeddedBroker(storage=s3_env["MANIAC_BROKER_STORAGE"])
    await asyncio.to_thread(first.start)
    try:
        await ensure_topics(first.bootstrap, [topic], partitions=1)
        assert await _produce(first.bootstrap, topic, range(30)) == list(range(30))
    finally:
        first.stop()

    # the same storage, the same port: the producer sends before anything fetched
    second = EmbeddedBroker(port=first.port, storage=s3_env["MANIAC_BROKER_STORAGE"])
    await asyncio.to_thread(second.start)
    try:
        assert await _produce(second.bootstrap, topic, range(30, 55)) == list(range(30, 55))
        assert await _read(second.bootstrap, topic, 55) == [b"v%d" % i for i in range(55)]
    finally:
        second.stop()


async def test_a_restarted_broker_on_s3_reads_a_partition_of_more_than_a_thousand_batches(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tansu lists a partition's batches, an S3 object each, as it is first fetched; past 1,000
    objects the listing takes a second page, which s3rver on Node 17+ answers with a 500
    unless given OpenSSL's legacy provider (its page tokens use DES): the restarted broker
    then failed every fetch of the partition, and did not start."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    topic = unique("durable")
    first = EmbeddedBroker(storage=s3_env["MANIAC_BROKER_STORAGE"])
    await asyncio.to_thread(first.start)
    try:
        await ensure_topics(first.bootstrap, [topic], partitions=1)
        await _produce(first.bootstrap, topic, range(1_005), per_batch=1)
    finally:
        first.stop()

    second = EmbeddedBroker(port=first.port, storage=s3_env["MANIAC_BROKER_STORAGE"])
    await asyncio.to_thread(second.start)
    try:
        assert await _read(second.bootstrap, topic, 1_005) == [b"v%d" % i for i in range(1_005)]
    finally:
        second.stop()


async def _produce(bootstrap: str, topic: str, values: range, per_batch: int = 10) -> list[int]:
    """Send ``v<i>`` for each value, ``per_batch`` to a batch; their offsets."""
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        offsets = []
        for start in range(values.start, values.stop, per_batch):
            sent = [
                await producer.send(topic, b"v%d" % i, partition=0)
                for i in range(start, min(start + per_batch, values.stop))
            ]
            offsets += [(await future).offset for future in sent]
        return offsets
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = create_consumer(bootstrap, group_id=unique("reader"))
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        values: list[bytes] = []
        for _ in range(50):
            fetched = await consumer.getmany(tp, timeout_ms=200)
            values += [r.value for r in fetched.get(tp, [])]
            if len(values) >= n:
                break
        return values
    finally:
        await consumer.stop()
