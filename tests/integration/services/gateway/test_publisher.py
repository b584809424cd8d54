"""The publisher on the real broker: record batches per partition, acknowledged offsets."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import pytest

from services.common.errors import ServiceUnavailable
from services.common.kafka import (
    EmbeddedBroker,
    create_consumer,
    create_producer,
    ensure_topics,
)
from services.gateway.publisher import Publisher
from tests.conftest import unique
from tests.support.proxy import proxied_broker


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


async def test_a_topic_of_one_partition_gets_every_record_in_order(
    broker: EmbeddedBroker, producer: Any
) -> None:
    topic = unique("single")
    await ensure_topics(broker.bootstrap, [topic], partitions=1)
    publisher = Publisher(producer, topic, timeout_s=30)
    messages = [(f"p/c{i}".encode(), b"%d" % i) for i in range(300)]
    await publisher.publish(messages[:200])
    await publisher.publish(messages[200:])

    records = await _read_all(broker.bootstrap, topic, len(messages))
    assert [(r.key, r.value) for r in records] == messages
    assert {r.partition for r in records} == {0}
    assert publisher.acked == {0: records[-1].offset}


class _HandedBatches:
    """The real producer, noting each record batch handed to it: how many per partition, and
    the size of its encoded bytes if it came already built."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.batches: dict[int, int] = {}
        self.built: list[int | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        self.batches[partition] = self.batches.get(partition, 0) + 1
        buffer = batch._buffer  # aiokafka keeps a batch's encoded bytes here once built
        self.built.append(None if buffer is None else len(buffer))
        return await self._producer.send_batch(batch, topic, partition=partition)


async def test_batches_reach_the_producer_encoded_and_compressed(
    broker: EmbeddedBroker, producer: Any
) -> None:
    """Each batch is encoded and compressed (zstd) before it is handed to the producer, in a
    thread beside the event loop, not later by the producer's sender on the loop itself."""
    topic = unique("built")
    await ensure_topics(broker.bootstrap, [topic], partitions=1)
    built = _HandedBatches(producer)
    publisher = Publisher(built, topic, timeout_s=30)
    messages = [(f"p/c{i}".encode(), b"%d:" % i + b"abc" * 2_000) for i in range(200)]
    await publisher.publish(messages)

    assert built.built
    assert None not in built.built, built.built
    assert sum(size or 0 for size in built.built) < 200 * 6_000 / 10  # compressed
    records = await _read_all(broker.bootstrap, topic, len(messages))
    assert [(r.key, r.value) for r in records] == messages


async def _publish_while_frozen(
    requests: list[list[tuple[bytes, bytes]]], *, producer_timeout_s: float, frozen_s: float
) -> tuple[Publisher, _HandedBatches, list[Any]]:
    """Publish every request at once to a broker frozen behind a proxy for ``frozen_s``: the
    first batches go out and wait for their answer, the rest queue. The publisher, the batches
    it handed to the producer, and every record read back."""
    topic = unique("frozen")
    async with proxied_broker() as (proxy, bootstrap):
        producer = create_producer(bootstrap, linger_ms=0, timeout_s=producer_timeout_s)
        counting = _HandedBatches(producer)
        try:
            await ensure_topics(bootstrap, [topic], partitions=4)
            await producer.start()
            publisher = Publisher(counting, topic, timeout_s=60)
            proxy.freeze()
            publishing = asyncio.gather(*(publisher.publish(messages) for messages in requests))
            await asyncio.sleep(frozen_s)
            proxy.thaw()
            await publishing
            records = await _read_all(bootstrap, topic, sum(map(len, requests)))
        finally:
            await producer.stop()
    return publisher, counting, records


async def test_requests_queued_behind_a_slow_broker_all_publish_within_the_timeout() -> None:
    """Requests waiting together to hand batches to the same partitions while the broker is
    slow to answer: each waits its turn, none gives up before the producer's timeout.

    (aiokafka's ``send_batch`` alone counted every turn of its wait from the first one, so
    most of these failed with KafkaTimeoutError after about half the timeout.)
    """
    requests = [[(f"p/r{r}-c{i}".encode(), b"x" * 1_000) for i in range(40)] for r in range(12)]
    publisher, _, records = await _publish_while_frozen(requests, producer_timeout_s=3, frozen_s=2)
    assert len(records) == 12 * 40
    assert sum(publisher.acked.values()) + len(publisher.acked) == 12 * 40


async def test_requests_waiting_together_share_record_batches() -> None:
    """While a partition's batch waits for the broker, the records of every request that
    arrives meanwhile gather into the next batches, instead of one batch per request."""
    requests = [
        [(f"p/r{r}-c{i}".encode(), b"%d" % r + b"x" * 500) for i in range(40)] for r in range(12)
    ]
    publisher, counting, records = await _publish_while_frozen(
        requests, producer_timeout_s=30, frozen_s=1.5
    )
    assert sorted((r.key, r.value) for r in records) == sorted(m for req in requests for m in req)
    assert len(counting.batches) == 4
    # one batch per request per partition would be 12 each; the first turns go before the
    # rest arrive, everything that arrived while they waited goes together after
    assert all(n <= 4 for n in counting.batches.values()), counting.batches
    assert sum(publisher.acked.values()) + len(publisher.acked) == 12 * 40
    # within a partition, a request's records keep the order they were published in
    for r in range(12):
        mine = [rec for rec in records if rec.key.startswith(b"p/r%d-" % r)]
        for partition in {rec.partition for rec in mine}:
            here = [rec for rec in mine if rec.partition == partition]
            by_index = sorted(here, key=lambda rec: int(rec.key.rsplit(b"-c", 1)[1]))
            assert [rec.offset for rec in by_index] == sorted(rec.offset for rec in here)


async def test_requests_wait_while_more_acknowledged_records_than_the_limit_are_not_stored(
    broker: EmbeddedBroker, topics: tuple[str, str], producer: Any
) -> None:
    publisher = Publisher(producer, topics[0], timeout_s=30)
    backlog = {"records": 5_000}
    publisher.limit_backlog(lambda: backlog["records"], 1_000)
    publishing = asyncio.create_task(publisher.publish([(b"p/c1", b"one")]))
    await asyncio.sleep(0.5)
    assert not publishing.done()
    assert publisher.acked == {}  # held before the broker saw it
    backlog["records"] = 1_000  # the worker caught up to the limit
    await asyncio.wait_for(publishing, timeout=10)
    assert list(publisher.acked.values()) == [0]
    records = await _read_all(broker.bootstrap, topics[0], 1)
    assert [(r.key, r.value) for r in records] == [(b"p/c1", b"one")]


async def test_the_bytes_acknowledged_and_not_stored_count_each_record_once(
    topics: tuple[str, str], producer: Any
) -> None:
    publisher = Publisher(producer, topics[0], timeout_s=30)
    publisher.limit_backlog_bytes(lambda: publisher.pending_bytes({}), 1 << 30)
    requests = [
        [(f"p/r{r}-c{i}".encode(), b"v" * (100 + i % 7)) for i in range(1_000)] for r in range(8)
    ]
    # concurrent requests share record batches, each acknowledged to every one of them
    await asyncio.gather(*(publisher.publish(messages) for messages in requests))
    sent = sum(len(key) + len(value) for messages in requests for key, value in messages)
    assert publisher.pending_bytes({}) == sent
    stored = {p: last + 1 for p, last in publisher.acked.items()}
    assert publisher.pending_bytes(stored) == 0
    assert publisher.pending_bytes({}) == 0  # what was stored is let go


def _publisher_snapshot() -> tracemalloc.Snapshot:
    """What is held of the allocations made in the publisher's module."""
    module = "*/" + Publisher.__module__.replace(".", "/") + ".py"
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, module)])


@pytest.mark.parametrize("byte_limit", [False, True], ids=["no-byte-limit", "byte-limit"])
async def test_acknowledgements_are_not_kept_once_stored_or_when_no_byte_limit_needs_them(
    topics: tuple[str, str], producer: Any, byte_limit: bool
) -> None:
    """A gateway runs for months: what it keeps per acknowledged record must be let go. Alone
    (no byte limit) it keeps nothing; in `maniac serve`, what was stored is let go even when
    no register request comes to look (created completions only)."""
    publisher = Publisher(producer, topics[0], timeout_s=30)
    stored: dict[int, int] = {}
    if byte_limit:
        publisher.limit_backlog_bytes(lambda: publisher.pending_bytes(stored), 1 << 30)

    async def created(round_: int) -> None:
        for i in range(2_000):
            assert publisher.publish_nowait(f"p/r{round_}-c{i}".encode(), b"v" * 1_000)
        await publisher.flush()
        stored.update({p: last + 1 for p, last in publisher.acked.items()})

    tracemalloc.start()
    try:
        await created(0)  # what a round needs at most (its futures, ...) is there before
        before = _publisher_snapshot()
        for round_ in range(1, 26):
            await created(round_)
        # 50,000 acknowledgements: some 3 MB when each one is kept
        grown = sum(s.size_diff for s in _publisher_snapshot().compare_to(before, "filename"))
        assert grown < 1_000_000
    finally:
        tracemalloc.stop()


async def test_a_request_held_past_the_publish_timeout_gets_503_and_publishes_nothing(
    topics: tuple[str, str], producer: Any
) -> None:
    publisher = Publisher(producer, topics[0], timeout_s=0.3)
    publisher.limit_backlog(lambda: 5_000, 1_000)
    with pytest.raises(ServiceUnavailable) as raised:
        await publisher.publish([(b"p/c1", b"one")])
    assert raised.value.details == {"reason": "backlog"}
    assert raised.value.headers == {"Retry-After": "1"}
    assert publisher.acked == {}

    publisher.limit_backlog(lambda: 5_000, 0)  # 0: no limit
    await publisher.publish([(b"p/c1", b"one")])
    assert list(publisher.acked.values()) == [0]


async def test_a_paused_publisher_holds_requests_until_resumed(
    broker: EmbeddedBroker, topics: tuple[str, str], producer: Any
) -> None:
    publisher = Publisher(producer, topics[0], timeout_s=30)
    await publisher.publish([(b"p/c0", b"zero")])
    publisher.pause()
    await publisher.settle()  # nothing in flight
    publishing = asyncio.create_task(publisher.publish([(b"p/c1", b"one")]))
    assert publisher.publish_nowait(b"p/c2", b"two")  # queued, not sent
    await asyncio.sleep(0.5)
    assert not publishing.done()
    assert list(publisher.acked.values()) == [0]  # the broker saw nothing new
    publisher.restart_offsets()
    assert publisher.acked == {}
    publisher.resume()
    await asyncio.wait_for(publishing, timeout=10)
    await publisher.flush()
    records = await _read_all(broker.bootstrap, topics[0], 3)
    assert sorted((r.key, r.value) for r in records) == [
        (b"p/c0", b"zero"),
        (b"p/c1", b"one"),
        (b"p/c2", b"two"),
    ]


async def test_created_records_are_held_up_to_their_bytes_until_acknowledged(
    broker: EmbeddedBroker, topics: tuple[str, str], producer: Any
) -> None:
    dropped: list[str] = []
    publisher = Publisher(
        producer,
        topics[0],
        timeout_s=30,
        on_drop=lambda d: dropped.append(d.completion_id),
        queue_bytes=10,
    )
    publisher.pause()  # the broker slow or away: records wait
    assert publisher.publish_nowait(b"p/c1", b"123456")
    assert not publisher.publish_nowait(b"p/c2", b"12345")  # 11 bytes held: over the 10
    assert publisher.publish_nowait(b"p/c3", b"1234")
    publisher.resume()
    await publisher.flush()
    assert publisher.publish_nowait(b"p/c4", b"1234567890")  # acknowledged: room again
    await publisher.flush()
    records = await _read_all(broker.bootstrap, topics[0], 3)
    assert sorted(r.key for r in records) == [b"p/c1", b"p/c3", b"p/c4"]
    assert dropped == ["c2"]


async def test_a_record_taken_for_the_producer_when_flush_gives_up_is_counted_as_dropped(
    topics: tuple[str, str], producer: Any
) -> None:
    dropped: list[tuple[str, str]] = []
    publisher = Publisher(
        producer,
        topics[0],
        timeout_s=30,
        on_drop=lambda d: dropped.append((d.completion_id, d.reason)),
        queue_bytes=100,
    )
    publisher.pause()  # the sender takes c1 from the queue and waits with it
    assert publisher.publish_nowait(b"p/c1", b"x" * 60)
    assert publisher.publish_nowait(b"p/c2", b"x" * 30)
    await publisher.flush(timeout_s=0.2)  # gives up: neither is published
    assert sorted(dropped) == [("c1", "shutdown"), ("c2", "shutdown")]
    publisher.resume()
    assert publisher.publish_nowait(b"p/c3", b"x" * 60)  # their bytes are free again
    await publisher.flush()
    assert len(dropped) == 2


async def test_settle_waits_for_what_was_handed_over_before_the_pause() -> None:
    async with proxied_broker() as (proxy, bootstrap):
        topic = unique("settle")
        await ensure_topics(bootstrap, [topic], partitions=1)
        producer = create_producer(bootstrap, linger_ms=0)
        await producer.start()
        try:
            publisher = Publisher(producer, topic, timeout_s=30)
            await publisher.publish([(b"p/warm", b"up")])
            proxy.freeze()  # the broker gets nothing until thawed
            publishing = asyncio.create_task(publisher.publish([(b"p/c1", b"one")]))
            await asyncio.sleep(0.2)
            publisher.pause()
            settling = asyncio.create_task(publisher.settle())
            await asyncio.sleep(0.5)
            assert not settling.done()  # the request let through is not acknowledged yet
            proxy.thaw()
            await asyncio.wait_for(settling, timeout=10)
            assert publishing.done()
            assert publisher.acked == {0: 1}
        finally:
            await producer.stop()


async def test_a_request_held_by_a_pause_past_its_timeout_gets_503(
    topics: tuple[str, str], producer: Any
) -> None:
    publisher = Publisher(producer, topics[0], timeout_s=0.3)
    publisher.pause()
    with pytest.raises(ServiceUnavailable) as raised:
        await publisher.publish([(b"p/c1", b"one")])
    assert raised.value.details == {"reason": "broker_restart"}
    assert raised.value.headers == {"Retry-After": "1"}
    assert publisher.acked == {}


async def test_a_request_that_gives_up_leaves_no_failure_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that times out stops waiting; the batches it handed over fail later, with
    nobody awaiting them. Their failures are taken, not left to asyncio's "Future exception
    was never retrieved" error (with a traceback) when they are collected."""
    async with proxied_broker() as (proxy, bootstrap):
        topic = unique("gives-up")
        await ensure_topics(bootstrap, [topic], partitions=1)
        producer = create_producer(bootstrap, linger_ms=0, timeout_s=1.0)
        await producer.start()
        try:
            publisher = Publisher(producer, topic, timeout_s=0.3)
            await publisher.publish([(b"p/warm", b"up")])
            proxy.freeze()
            with pytest.raises(ServiceUnavailable):
                await publisher.publish([(b"p/c1", b"one")])
            await asyncio.sleep(2.5)  # the producer's own timeout fails the batch meanwhile
            gc.collect()
            await asyncio.sleep(0)
        finally:
            proxy.thaw()
            await producer.stop()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
