"""Publishes completion events to Kafka.

Two ways: :meth:`Publisher.publish` waits for the broker's acknowledgement (register answers
only after it); :meth:`Publisher.publish_nowait` queues a record and returns at once, so that
recording a created completion never adds a broker round-trip to the client's latency. What
cannot be recorded that way is counted in ``maniac_telemetry_dropped_total`` (and per project in
``maniac_project_records_dropped_total``), logged, and handed to ``on_drop`` (which keeps it in
ClickHouse, best-effort).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from schemas.events import split_key
from services.common.errors import ServiceUnavailable
from services.common.kafka import partition_of
from services.common.losses import Dropped
from services.common.metrics import (
    PROJECT_ACKNOWLEDGED,
    PROJECT_DROPPED,
    TELEMETRY_DROPPED,
    TELEMETRY_PUBLISHED,
    project_label,
)

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(
        self,
        producer: Any,
        topic: str,
        timeout_s: float,
        queue_size: int = 10_000,
        on_drop: Callable[[Dropped], None] | None = None,
    ) -> None:
        self._producer = producer
        self._on_drop = on_drop
        self.topic = topic
        self._timeout_s = timeout_s
        self.acked: dict[int, int] = {}
        """Highest acknowledged offset per partition (used to drain before shutdown)."""
        self._queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(queue_size)
        self._pending: set[asyncio.Future[Any]] = set()
        self._partition_locks: dict[int, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None

    def _ack(self, meta: Any) -> None:
        self._ack_offset(meta.partition, meta.offset)

    def _ack_offset(self, partition: int, offset: int) -> None:
        if offset > self.acked.get(partition, -1):
            self.acked[partition] = offset

    async def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker acknowledged every one.

        Records are grouped into one record batch per partition (by key, as the producer's
        partitioner does for single records) and handed to the producer whole: building
        batches costs about a third of sending the records one by one. Each record is still
        its own Kafka record. Raises :class:`ServiceUnavailable` when the broker cannot take
        them in time.
        """
        if not messages:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                sent = await self._send_batches(messages)
                metadata = await asyncio.gather(*(future for future, _ in sent))
        except Exception as exc:
            log.error("publish_failed", messages=len(messages), error=repr(exc))
            raise ServiceUnavailable(
                "The event broker is unavailable; nothing in this request is guaranteed "
                "stored. Retry the request: completions are deduplicated by id.",
                details={"reason": type(exc).__name__},
            ) from exc
        for meta, (_, records) in zip(metadata, sent, strict=True):
            self._ack_offset(meta.partition, meta.offset + records - 1)
        TELEMETRY_PUBLISHED.inc(len(messages))
        by_project = Counter(split_key(key)[0] for key, _ in messages)
        for project, n in by_project.items():
            PROJECT_ACKNOWLEDGED.labels(project_label(project)).inc(n)

    async def _send_batches(
        self, messages: list[tuple[bytes, bytes]]
    ) -> list[tuple[asyncio.Future[Any], int]]:
        """Hand the records to the producer in full batches; (delivery, records) per batch."""
        partitions = len(await self._producer.partitions_for(self.topic))
        filling: dict[int, Any] = {}
        sent: list[tuple[asyncio.Future[Any], int]] = []
        for key, value in messages:
            partition = partition_of(key, partitions)
            batch = filling.get(partition)
            if batch is not None:
                if batch.append(key=key, value=value, timestamp=None) is not None:
                    continue
                sent.append(await self._send_batch(batch, partition))  # full (and closed)
            batch = filling[partition] = self._producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any record
        for partition, batch in filling.items():
            sent.append(await self._send_batch(batch, partition))
        return sent

    async def _send_batch(self, batch: Any, partition: int) -> tuple[asyncio.Future[Any], int]:
        batch.close()  # a closed batch is sent without lingering, and no other record joins it
        # One request at a time hands a batch to a partition: the producer queues one batch per
        # partition and makes the others wait for it to go, and its wait loop (aiokafka 0.14
        # ``add_batch``) subtracts the time since it first waited on every turn, so concurrent
        # waiters gave up with KafkaTimeoutError long before the timeout.
        lock = self._partition_locks.setdefault(partition, asyncio.Lock())
        async with lock:
            future = await self._producer.send_batch(batch, self.topic, partition=partition)
        return future, batch.record_count()

    # -- fire and forget, for created completions --------------------------------------------

    def publish_nowait(self, key: bytes, value: bytes) -> bool:
        """Queue one record for the background sender; False (counted, logged) if full."""
        try:
            self._queue.put_nowait((key, value))
        except asyncio.QueueFull:
            self._dropped(key, "queue_full", None)
            return False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="telemetry-publisher")
        return True

    async def _run(self) -> None:
        while True:
            key, value = await self._queue.get()
            try:
                future = await self._producer.send(self.topic, key=key, value=value)
            except Exception as exc:
                self._dropped(key, "broker_error", exc)
            else:
                self._pending.add(future)
                future.add_done_callback(lambda f, k=key: self._delivered(f, k))
            finally:
                self._queue.task_done()

    def _delivered(self, future: asyncio.Future[Any], key: bytes) -> None:
        self._pending.discard(future)
        if future.cancelled():
            self._dropped(key, "broker_error", asyncio.CancelledError())
        elif future.exception() is not None:
            self._dropped(key, "broker_error", future.exception())
        else:
            self._ack(future.result())
            TELEMETRY_PUBLISHED.inc()
            PROJECT_ACKNOWLEDGED.labels(project_label(split_key(key)[0])).inc()

    def _dropped(self, key: bytes, reason: str, exc: BaseException | None) -> None:
        """Count, log and hand on one record that will not be published."""
        project, completion_id = split_key(key)
        TELEMETRY_DROPPED.labels(reason).inc()
        PROJECT_DROPPED.labels(project_label(project), reason).inc()
        error = "" if exc is None else repr(exc)
        log.error("telemetry_dropped", reason=reason, key=key.decode(errors="replace"), error=error)
        if self._on_drop is not None:
            self._on_drop(Dropped(project, completion_id, reason, error, datetime.now(UTC)))

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is acknowledged or counted as dropped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
                while self._pending:
                    await asyncio.wait(set(self._pending))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Records already handed to the producer are counted by their delivery callback.
        while not self._queue.empty():
            key, _ = self._queue.get_nowait()
            self._dropped(key, "shutdown", None)
