"""The worker against the real broker and the real ClickHouse engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from schemas.events import encode_event, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker, create_consumer, create_producer
from services.common.settings import ServeSettings
from services.worker.runner import Worker
from tests.conftest import eventually


def _event(completion_id: str, project: str = "p", **output: Any) -> tuple[bytes, bytes]:
    item = {
        "input": {"messages": [{"role": "user", "content": "hi"}], "model": "m"},
        "output": {"choices": [], **output},
    }
    value = encode_event(
        kind="register",
        project=project,
        container="c",
        completion_id=completion_id,
        received_at_ms=1_700_000_000_000,
        item=item,
    )
    return message_key(project, completion_id), value


@pytest_asyncio.fixture(loop_scope="session")
async def producer(broker: EmbeddedBroker) -> AsyncIterator[Any]:
    p = create_producer(broker.bootstrap, linger_ms=0)
    await p.start()
    yield p
    await p.stop()


async def _produce(producer: Any, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    futures = [await producer.send(topic, key=k, value=v) for k, v in messages]
    await asyncio.gather(*futures)


class RunningWorker:
    def __init__(self, settings: ServeSettings, broker: EmbeddedBroker, ch: ClickHouse) -> None:
        self.settings, self.broker, self.ch = settings, broker, ch

    async def __aenter__(self) -> Worker:
        s = self.settings
        self.consumer = create_consumer(
            self.broker.bootstrap,
            group_id=s.consumer_group,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
        )
        self.producer = create_producer(self.broker.bootstrap)
        await self.consumer.start()
        await self.producer.start()
        self.worker = Worker(
            s,
            self.consumer,
            self.producer,
            self.ch,
            topic=s.topic,
            dead_letter_topic=s.dead_letter_topic,
        )
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def __aexit__(self, *_: object) -> None:
        self.worker.stop()
        await self.task
        await self.consumer.stop()
        await self.producer.stop()


async def _count(ch: ClickHouse) -> int:
    return int((await ch.rows("SELECT count() FROM {database}.completions FINAL"))[0][0])


async def test_valid_messages_are_stored_once_and_offsets_committed(
    settings: ServeSettings, broker: EmbeddedBroker, clickhouse: ClickHouse, producer: Any
) -> None:
    messages = [_event(f"id-{i}") for i in range(50)]
    await _produce(producer, settings.topic, messages + messages[:10])  # 10 delivered twice
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: _count_is(clickhouse, 50))
        await eventually(lambda: _all_committed(worker, 60))
    raw = await clickhouse.rows("SELECT count() FROM {database}.completions")
    assert raw[0][0] >= 50  # duplicates may sit in parts until merged; FINAL hides them


async def _count_is(ch: ClickHouse, n: int) -> bool:
    return await _count(ch) == n


async def _all_committed(worker: Worker, total: int) -> bool:
    return sum(worker.committed_offsets().values()) == total


async def test_poison_message_goes_to_dead_letter_and_partition_moves_on(
    settings: ServeSettings, broker: EmbeddedBroker, clickhouse: ClickHouse, producer: Any
) -> None:
    key = b"p/poison"
    await _produce(
        producer,
        settings.topic,
        [_event("before"), (key, b"{not json"), _event("bad", created="nope"), _event("after")],
    )
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _count_is(clickhouse, 2))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {"before", "after"}

    consumer = create_consumer(broker.bootstrap, group_id="dlq-reader", session_timeout_ms=2000)
    await consumer.start()
    consumer.subscribe([settings.dead_letter_topic])
    dead: list[Any] = []
    try:
        for _ in range(100):
            fetched = await consumer.getmany(timeout_ms=200, max_records=10)
            dead += [r for rs in fetched.values() for r in rs]
            if len(dead) == 2:
                break
    finally:
        await consumer.stop()
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert reasons[0].startswith("not JSON")
    assert "output.created" in reasons[1]
    assert {r.value for r in dead} >= {b"{not json"}
    assert all(dict(r.headers)["source_topic"].decode() == settings.topic for r in dead)


async def test_a_new_worker_resumes_from_committed_offsets(
    settings: ServeSettings, broker: EmbeddedBroker, clickhouse: ClickHouse, producer: Any
) -> None:
    await _produce(producer, settings.topic, [_event(f"first-{i}") for i in range(5)])
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: _all_committed(worker, 5))
    await clickhouse.command("TRUNCATE TABLE {database}.completions")
    await _produce(producer, settings.topic, [_event(f"second-{i}") for i in range(3)])
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _count_is(clickhouse, 3))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {f"second-{i}" for i in range(3)}


async def test_insert_failures_are_retried_without_commit_then_resume(
    settings: ServeSettings, broker: EmbeddedBroker, clickhouse: ClickHouse, producer: Any
) -> None:
    # Make ClickHouse refuse inserts for a while by renaming the table away, for real.
    await clickhouse.command("RENAME TABLE {database}.completions TO {database}.completions_away")
    await _produce(producer, settings.topic, [_event(f"id-{i}") for i in range(5)])
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await asyncio.sleep(1.5)
        assert worker.committed_offsets() == {}
        await clickhouse.command(
            "RENAME TABLE {database}.completions_away TO {database}.completions"
        )
        await eventually(lambda: _count_is(clickhouse, 5))
        await eventually(lambda: _all_committed(worker, 5))
