"""Helpers for tests that run the worker on the real broker and engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from schemas.events import encode_event, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import MAX_RECORD_BYTES, create_producer
from services.common.pricing import PriceCatalog
from services.common.settings import ServeSettings, WorkerSettings
from services.worker.pipeline.types import Message, Partition
from services.worker.runner import Worker, create_worker_consumer
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
        self,
        settings: ServeSettings,
        broker: Broker,
        ch: ClickHouse,
        *,
        prices: bool = False,
        assign: bool = False,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self.settings, self.broker, self.ch = settings, broker, ch
        self.prices = PriceCatalog.load() if prices else None
        self.assign = assign
        self.max_record_bytes = max_record_bytes

    async def __aenter__(self) -> Worker:
        s = self.settings
        self.consumer = create_worker_consumer(self.broker.bootstrap, s)
        self.producer = create_producer(
            self.broker.bootstrap, max_record_bytes=self.max_record_bytes
        )
        await self.consumer.start()
        await self.producer.start()
        self.worker = Worker(
            s, self.consumer, self.producer, self.ch, prices=self.prices, assign=self.assign
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
    return await all_committed_by([worker], total)


async def all_committed_by(workers: list[Worker], total: int) -> bool:
    """Whether the furthest offsets these workers committed, partition by partition, add up
    to ``total`` (partitions move between workers of a group)."""
    furthest: dict[int, int] = {}
    for worker in workers:
        for partition, offset in worker.committed_offsets().items():
            furthest[partition] = max(furthest.get(partition, 0), offset)
    return sum(furthest.values()) == total


@contextlib.asynccontextmanager
async def completions_away(ch: ClickHouse) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """ClickHouse down for the worker, for real: ``completions`` is renamed away, so every
    lookup and insert fails, until the function yielded brings it back (on leaving at the
    latest)."""
    await ch.command("RENAME TABLE {database}.completions TO {database}.completions_away")

    async def back() -> None:
        await ch.command(
            "RENAME TABLE IF EXISTS {database}.completions_away TO {database}.completions"
        )

    try:
        yield back
    finally:
        await back()


async def counted(ch: ClickHouse) -> tuple[int, int, int]:
    """Completions as the aggregates count them: requests in ``usage_hourly``, the list's
    total in ``completion_counts``, and rows of ``completions`` after FINAL."""
    [(requests, listed, stored)] = await ch.rows(
        "SELECT (SELECT sum(requests) FROM {database}.usage_hourly), "
        "(SELECT sum(completions) FROM {database}.completion_counts), "
        "(SELECT count() FROM {database}.completions FINAL)"
    )
    return int(requests), int(listed), int(stored)


class _Commits:
    """Takes the place of the consumer for :func:`store`: offsets committed go nowhere."""

    async def commit(self, offsets: dict[Any, int]) -> None:
        pass


async def store(ch: ClickHouse, values: list[bytes]) -> None:
    """Store event values as the worker does (same pipeline: decode, transform, deduplicate
    with retractions, insert), in one batch, without a broker."""
    settings = WorkerSettings(batch_max_rows=max(len(values), 1), insert_retry_initial_s=0.05)
    worker = Worker(settings, _Commits(), None, ch)
    for offset, value in enumerate(values):
        await worker.pipeline.first.submit(Message(Partition("store", 0), offset, None, value))
    await worker.flush()
