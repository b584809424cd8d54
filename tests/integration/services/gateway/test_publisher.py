"""The publisher on the real broker: record batches per partition, acknowledged offsets."""

from __future__ import annotations

from typing import Any

from services.common.kafka import EmbeddedBroker, create_consumer
from services.gateway.publisher import Publisher


async def _read_all(bootstrap: str, topic: str, expected: int) -> list[Any]:
    consumer = create_consumer(
        bootstrap, group_id=f"{topic}-reader", session_timeout_ms=2000, heartbeat_interval_ms=300
    )
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.subscribe([topic])
        for _ in range(200):
            fetched = await consumer.getmany(timeout_ms=200, max_records=1000)
            records += [r for batch in fetched.values() for r in batch]
            if len(records) >= expected:
                break
    finally:
        await consumer.stop()
    return records


async def test_publish_sends_one_record_per_message_where_single_sends_would_go(
    broker: EmbeddedBroker, topics: tuple[str, str], producer: Any
) -> None:
    topic = topics[0]
    publisher = Publisher(producer, topic, timeout_s=30)
    # about 1.5 MB per partition in the first request: more than one record batch each
    messages = [(f"p/c{i}".encode(), b"%d:" % i + b"x" * 10_000) for i in range(700)]
    await publisher.publish(messages[:600])
    await publisher.publish(messages[600:])
    single = [await producer.send_and_wait(topic, key=key, value=b"single") for key, _ in messages]

    records = await _read_all(broker.bootstrap, topic, 2 * len(messages))
    assert len(records) == 2 * len(messages)
    batched = {r.key: r for r in records if r.value != b"single"}
    singles = {r.key: r for r in records if r.value == b"single"}
    assert set(batched) == {key for key, _ in messages}
    for key, value in messages:
        assert batched[key].value == value
        # the same key goes to the same partition either way, so its records stay in order
        assert batched[key].partition == singles[key].partition
    by_partition: dict[int, list[Any]] = {}
    for r in sorted(records, key=lambda r: r.offset):
        by_partition.setdefault(r.partition, []).append(r)
    # acked holds the offset of the last record each partition acknowledged to publish()
    for partition, offset in publisher.acked.items():
        last_batched = max(r.offset for r in by_partition[partition] if r.value != b"single")
        assert offset == last_batched
    assert set(publisher.acked) == {r.partition for r in batched.values()}
    assert {m.partition for m in single} == set(publisher.acked)
