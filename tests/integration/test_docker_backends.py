"""The same pipeline on real Apache Kafka and ClickHouse server images (testcontainers).

Runs only where a Docker engine answers; skipped cleanly elsewhere. To run the whole suite
on these backends instead of the embedded ones: ``MANIAC_TEST_BACKEND=docker make test``.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from schemas.events import encode_event, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import create_consumer, create_producer, ensure_topics
from services.common.migrations import migrate
from services.common.settings import WorkerSettings
from services.query.repository import CompletionsRepository
from services.worker.runner import Worker
from tests.conftest import eventually

pytestmark = pytest.mark.docker


async def test_register_events_reach_a_real_clickhouse_through_real_kafka(
    docker_kafka: str, docker_clickhouse: ClickHouse
) -> None:
    suffix = uuid.uuid4().hex[:8]
    ch = docker_clickhouse.with_database(f"t_{suffix}")
    await migrate(ch)
    topic, dlq = f"completions-{suffix}", f"completions-{suffix}.dlq"
    await ensure_topics(docker_kafka, [topic, dlq], partitions=4)
    producer = create_producer(docker_kafka)
    await producer.start()
    for i in range(20):
        await producer.send_and_wait(
            topic,
            key=message_key("p", f"id-{i}"),
            value=encode_event(
                kind="register",
                project="p",
                container="c",
                completion_id=f"id-{i}",
                received_at_ms=1_700_000_000_000 + i,
                item={"input": {"messages": []}},
            ),
        )
    consumer = create_consumer(docker_kafka, group_id=f"g-{suffix}")
    await consumer.start()
    settings = WorkerSettings(topic=topic, dead_letter_topic=dlq, batch_max_ms=50)
    worker = Worker(settings, consumer, producer, ch)
    task = asyncio.create_task(worker.run())
    repository = CompletionsRepository(ch)

    async def all_listed() -> bool:
        _, total = await repository.list(
            "p", limit=1, offset=0, model=None, container=None, order="desc"
        )
        return total == 20

    try:
        await eventually(all_listed, timeout_s=60)
    finally:
        worker.stop()
        await task
        await consumer.stop()
        await producer.stop()
        await ch.command("DROP DATABASE IF EXISTS {database}")
