"""Publishes completion events to Kafka.

Two ways: :meth:`Publisher.publish` waits for the broker's acknowledgement (register answers
only after it); :meth:`Publisher.publish_nowait` queues a record and returns at once, so that
recording a created completion never adds a broker round-trip to the client's latency. What
cannot be recorded that way is counted in ``maniac_telemetry_dropped_total`` and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from services.common.errors import ServiceUnavailable
from services.common.metrics import TELEMETRY_DROPPED, TELEMETRY_PUBLISHED

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(
        self, producer: Any, topic: str, timeout_s: float, queue_size: int = 10_000
    ) -> None:
        self._producer = producer
        self.topic = topic
        self._timeout_s = timeout_s
        self.acked: dict[int, int] = {}
        """Highest acknowledged offset per partition (used to drain before shutdown)."""
        self._queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(queue_size)
        self._pending: set[asyncio.Future[Any]] = set()
        self._task: asyncio.Task[None] | None = None

    def _ack(self, meta: Any) -> None:
        if meta.offset > self.acked.get(meta.partition, -1):
            self.acked[meta.partition] = meta.offset

    async def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker acknowledged every one.

        Raises :class:`ServiceUnavailable` when the broker cannot take them in time.
        """
        if not messages:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                futures = [
                    await self._producer.send(self.topic, key=key, value=value)
                    for key, value in messages
                ]
                metadata = await asyncio.gather(*futures)
        except Exception as exc:
            log.error("publish_failed", messages=len(messages), error=repr(exc))
            raise ServiceUnavailable(
                "The event broker is unavailable; nothing in this request is guaranteed "
                "stored. Retry the request: completions are deduplicated by id.",
                details={"reason": type(exc).__name__},
            ) from exc
        for meta in metadata:
            self._ack(meta)
        TELEMETRY_PUBLISHED.inc(len(metadata))

    # -- fire and forget, for created completions --------------------------------------------

    def publish_nowait(self, key: bytes, value: bytes) -> bool:
        """Queue one record for the background sender; False (counted, logged) if full."""
        try:
            self._queue.put_nowait((key, value))
        except asyncio.QueueFull:
            TELEMETRY_DROPPED.labels("queue_full").inc()
            log.error("telemetry_dropped", reason="queue_full", key=key.decode(errors="replace"))
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
                self._dropped(key, exc)
            else:
                self._pending.add(future)
                future.add_done_callback(lambda f, k=key: self._delivered(f, k))
            finally:
                self._queue.task_done()

    def _delivered(self, future: asyncio.Future[Any], key: bytes) -> None:
        self._pending.discard(future)
        if future.cancelled():
            self._dropped(key, asyncio.CancelledError())
        elif future.exception() is not None:
            self._dropped(key, future.exception())
        else:
            self._ack(future.result())
            TELEMETRY_PUBLISHED.inc()

    @staticmethod
    def _dropped(key: bytes, exc: BaseException | None) -> None:
        TELEMETRY_DROPPED.labels("broker_error").inc()
        log.error(
            "telemetry_dropped",
            reason="broker_error",
            key=key.decode(errors="replace"),
            error=repr(exc),
        )

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
        left = self._queue.qsize()
        if left:
            TELEMETRY_DROPPED.labels("shutdown").inc(left)
            log.error("telemetry_dropped", reason="shutdown", records=left)
