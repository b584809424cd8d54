from __future__ import annotations

import socket

import pytest

from services.common.kafka import (
    EmbeddedBroker,
    broker_reachable,
    create_consumer,
    create_producer,
    ensure_topics,
)


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


async def test_ensure_topics_is_idempotent(broker: EmbeddedBroker, topics: tuple[str, str]) -> None:
    await ensure_topics(broker.bootstrap, list(topics), partitions=4)


async def test_reachability(broker: EmbeddedBroker) -> None:
    assert await broker_reachable(broker.bootstrap)
    stopped = EmbeddedBroker()
    assert not await broker_reachable(stopped.bootstrap, timeout_s=0.5)


def test_broker_stops_and_frees_its_port() -> None:
    embedded = EmbeddedBroker()
    embedded.start()
    embedded.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", embedded.port), timeout=0.5)
