"""Helpers for tests that run the worker on the real broker and engine."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.events import encode_event, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import create_consumer, create_producer
from services.common.pricing import PriceCatalog
from services.common.settings import ServeSettings
from services.worker.runner import Worker
from tests.conftest import Broker


def event(completion_id: str, project: str = "p", **output: Any) -> tuple[bytes, bytes]:
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


async def produce(producer: Any, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    futures = [await producer.send(topic, key=k, value=v) for k, v in messages]
    await asyncio.gather(*futures)


class RunningWorker:
    def __init__(
        self, settings: ServeSettings, broker: Broker, ch: ClickHouse, *, prices: bool = False
    ) -> None:
        self.settings, self.broker, self.ch = settings, broker, ch
        self.prices = PriceCatalog.load() if prices else None

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
            prices=self.prices,
        )
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def __aexit__(self, *_: object) -> None:
        self.worker.stop()
        await self.task
        await self.consumer.stop()
        await self.producer.stop()


async def count(ch: ClickHouse) -> int:
    return int((await ch.rows("SELECT count() FROM {database}.completions FINAL"))[0][0])


async def count_is(ch: ClickHouse, n: int) -> bool:
    return await count(ch) == n


async def all_committed(worker: Worker, total: int) -> bool:
    return sum(worker.committed_offsets().values()) == total
