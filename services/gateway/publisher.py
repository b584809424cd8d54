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
import bisect
import contextlib
import functools
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from schemas.events import split_key
from services.common.errors import ServiceUnavailable
from services.common.kafka import partitions_of
from services.common.logging import detached
from services.common.losses import Dropped
from services.common.metrics import (
    PROJECT_ACKNOWLEDGED,
    PROJECT_DROPPED,
    TELEMETRY_DROPPED,
    TELEMETRY_PUBLISHED,
    project_label,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Publisher:
    def __init__(
        self,
        producer: Any,
        topic: str,
        timeout_s: float,
        queue_size: int = 10_000,
        on_drop: Callable[[Dropped], None] | None = None,
        queue_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self._producer = producer
        self._on_drop = on_drop
        self.topic = topic
        self._timeout_s = timeout_s
        self.acked: dict[int, int] = {}
        """Highest acknowledged offset per partition (used to drain before shutdown)."""
        self._queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(queue_size)
        self._max_queued_bytes = queue_bytes
        self._queued_bytes = 0
        """Bytes of created completions' records queued or handed to the producer, not yet
        acknowledged: records of requests of megabytes would fill memory while the broker is
        slow or away, however few of them the queue holds."""
        self._pending: set[asyncio.Future[Any]] = set()
        self._lanes: dict[int, _Lane] = {}
        self._backlog: Callable[[], int] | None = None
        self._max_backlog = 0
        self._backlog_bytes: Callable[[], int] | None = None
        self._max_backlog_bytes = 0
        self._acked_bytes: dict[int, _AckedBytes] = {}
        """Per partition, the bytes of acknowledged records by offset (for the byte bound
        only: kept while it is set)."""
        self._acks_unchecked = 0
        """Acknowledgements since the byte backlog was last read (which lets go the stored)."""
        self._task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._publishing = 0
        """Register publishes past the wait for room, not yet acknowledged or failed."""
        self._handing = False
        """The background sender is handing a record to the producer."""

    def limit_backlog(self, backlog: Callable[[], int], max_records: int) -> None:
        """Hold register requests while ``backlog()`` (acknowledged records not yet stored) is
        over ``max_records``.

        For ``maniac serve``, where the worker storing the records shares the machine: a
        gateway that acknowledges faster than the worker stores takes the CPU the worker needs
        and only makes the backlog, and the time until what it acknowledged is visible, grow.
        A held request's wait counts in its publish timeout; past it, a 503 and nothing
        published. Separate gateway and workers need no such limit: Kafka holds the backlog and
        the workers scale on their own.
        """
        self._backlog = backlog if max_records > 0 else None
        self._max_backlog = max_records

    def limit_backlog_bytes(self, backlog_bytes: Callable[[], int], max_bytes: int) -> None:
        """Hold register requests as well while ``backlog_bytes()`` (the bytes of the
        acknowledged records not yet stored, see :meth:`pending_bytes`) is over ``max_bytes``.
        Counted in records only, a backlog of items of megabytes (images inline) was
        gigabytes, held in the embedded broker's memory."""
        self._backlog_bytes = backlog_bytes if max_bytes > 0 else None
        self._max_backlog_bytes = max_bytes

    def pending_bytes(self, reached: dict[int, int]) -> int:
        """Bytes of the records acknowledged here at or past ``reached`` (per partition,
        the next offset to store; a partition missing: none of it is stored), counted while
        :meth:`limit_backlog_bytes` is set."""
        return sum(
            acked.pending(reached.get(partition, 0))
            for partition, acked in self._acked_bytes.items()
        )

    def _behind(self) -> bool:
        if self._backlog is not None and self._backlog() > self._max_backlog:
            return True
        backlog_bytes = self._backlog_bytes
        return backlog_bytes is not None and backlog_bytes() > self._max_backlog_bytes

    async def _room(self) -> None:
        while True:
            if not self._open.is_set():
                await self._open.wait()
            elif self._behind():
                await asyncio.sleep(0.02)
            else:
                return

    # -- pausing, while the broker behind the producer is replaced ---------------------------

    def pause(self) -> None:
        """Hold every publish from now on until :meth:`resume`: register requests wait (in
        their timeout, as for room), created completions wait in the queue."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def settle(self) -> None:
        """Once paused: wait until every record handed to the producer before is acknowledged
        (or failed, and counted)."""
        while self._publishing or self._handing or self._pending:
            await asyncio.sleep(0.005)

    def restart_offsets(self) -> None:
        """Forget the acknowledged offsets: the log behind the producer starts again at 0."""
        self.acked.clear()
        self._acked_bytes.clear()

    def _ack(self, meta: Any, size: int) -> None:
        self._ack_offset(meta.partition, meta.offset, size)

    def _ack_offset(self, partition: int, offset: int, size: int) -> None:
        """Records up to ``offset`` of ``partition`` are acknowledged, the last ones (from
        the previous acknowledgement) holding ``size`` bytes."""
        if offset > self.acked.get(partition, -1):
            self.acked[partition] = offset
        if self._backlog_bytes is None:
            return  # no byte bound: a gateway of its own would keep them forever
        acked = self._acked_bytes.get(partition)
        if acked is None:
            acked = self._acked_bytes[partition] = _AckedBytes()
        acked.add(offset, size)
        self._acks_unchecked += 1
        if self._acks_unchecked >= ACKS_UNCHECKED:
            # created completions only: no register request reads the backlog, which lets
            # go of what was stored
            self._acks_unchecked = 0
            self._backlog_bytes()

    async def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker acknowledged every one.

        Records go to their partition (by key, as the producer's partitioner does for single
        records) in record batches handed to the producer whole: building batches costs about
        a third of sending the records one by one. Each record is still its own Kafka record.
        Concurrent requests share batches (see :class:`_Lane`). Raises
        :class:`ServiceUnavailable` when the broker cannot take them in time.
        """
        if not messages:
            return
        held = True
        try:
            async with asyncio.timeout(self._timeout_s):  # the wait for room counts in it too
                await self._room()
                held = False
                self._publishing += 1
                try:
                    metadata, batches = await self._hand_over(messages)
                finally:
                    self._publishing -= 1
        except Exception as exc:
            if held and not self._open.is_set():
                raise ServiceUnavailable(
                    "The embedded broker is being restarted to give back its memory; nothing "
                    "in this request was published. Retry the request.",
                    details={"reason": "broker_restart"},
                    headers={"Retry-After": "1"},
                ) from exc
            if held:
                raise ServiceUnavailable(
                    "Ingestion is behind: more acknowledged records than "
                    f"{self._max_backlog} (or {self._max_backlog_bytes} bytes of them) are "
                    "waiting to be stored. Retry the request later.",
                    details={"reason": "backlog"},
                    headers={"Retry-After": "1"},
                ) from exc
            log.error("publish_failed", messages=len(messages), error=repr(exc))
            raise ServiceUnavailable(
                "The event broker is unavailable; nothing in this request is guaranteed "
                "stored. Retry the request: completions are deduplicated by id.",
                details={"reason": type(exc).__name__},
            ) from exc
        for meta, (_, records, size) in zip(metadata, batches, strict=True):
            self._ack_offset(meta.partition, meta.offset + records - 1, size)
        TELEMETRY_PUBLISHED.inc(len(messages))
        by_project = Counter(split_key(key)[0] for key, _ in messages)
        for project, n in by_project.items():
            PROJECT_ACKNOWLEDGED.labels(project_label(project)).inc(n)

    async def _hand_over(
        self, messages: list[tuple[bytes, bytes]]
    ) -> tuple[list[Any], list[Delivery]]:
        partitions = len(await self._producer.partitions_for(self.topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        chosen = partitions_of([key for key, _ in messages], partitions).tolist()
        for partition, message in zip(chosen, messages, strict=True):
            by_partition.setdefault(partition, []).append(message)
        handed = [self._lane(p).add(records) for p, records in by_partition.items()]
        batches = [b for found in await _shielded(handed) for b in found]
        return await _shielded([delivery for delivery, _, _ in batches]), batches

    def _lane(self, partition: int) -> _Lane:
        lane = self._lanes.get(partition)
        if lane is None:
            lane = self._lanes[partition] = _Lane(self._producer, self.topic, partition)
        return lane

    # -- fire and forget, for created completions --------------------------------------------

    def publish_nowait(self, key: bytes, value: bytes) -> bool:
        """Queue one record for the background sender; False (counted, logged) if full: its
        records or their bytes."""
        if self._queued_bytes + len(value) > self._max_queued_bytes:
            self._dropped(key, "queue_full", None)
            return False
        try:
            self._queue.put_nowait((key, value))
        except asyncio.QueueFull:
            self._dropped(key, "queue_full", None)
            return False
        self._queued_bytes += len(value)
        if self._task is None:
            self._task = detached(self._run(), name="telemetry-publisher")
        return True

    async def _run(self) -> None:
        while True:
            key, value = await self._queue.get()
            try:
                if not self._open.is_set():
                    await self._open.wait()
                self._handing = True
                future = await self._producer.send(self.topic, key=key, value=value)
            except asyncio.CancelledError:  # flush gave up: the record never reached the producer
                self._queued_bytes -= len(value)
                self._dropped(key, "shutdown", None)
                raise
            except Exception as exc:
                self._queued_bytes -= len(value)
                self._dropped(key, "broker_error", exc)
            else:
                self._pending.add(future)
                future.add_done_callback(
                    functools.partial(self._delivered, key=key, size=len(value))
                )
            finally:
                self._handing = False
                self._queue.task_done()

    def _delivered(self, future: asyncio.Future[Any], *, key: bytes, size: int) -> None:
        self._pending.discard(future)
        self._queued_bytes -= size
        if future.cancelled():
            self._dropped(key, "broker_error", asyncio.CancelledError())
        elif future.exception() is not None:
            self._dropped(key, "broker_error", future.exception())
        else:
            self._ack(future.result(), len(key) + size)
            TELEMETRY_PUBLISHED.inc()
            PROJECT_ACKNOWLEDGED.labels(project_label(split_key(key)[0])).inc()

    def _dropped(self, key: bytes, reason: str, exc: BaseException | None) -> None:
        """Count, log and hand on one record that will not be published."""
        project, completion_id = split_key(key)
        TELEMETRY_DROPPED.labels(reason).inc()
        PROJECT_DROPPED.labels(project_label(project), reason).inc()
        error = "" if exc is None else repr(exc)
        log.error(
            "telemetry_dropped",
            reason=reason,
            project=project,
            key=key.decode(errors="replace"),
            error=error,
        )
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
            key, value = self._queue.get_nowait()
            self._queued_bytes -= len(value)
            self._dropped(key, "shutdown", None)


ACKS_UNCHECKED = 1_000
"""Acknowledgements after which the byte backlog is read (letting go of what was stored) even
when no register request came to read it."""

Delivery = tuple["asyncio.Future[Any]", int, int]
"""A batch handed to the producer: its delivery (record metadata of its first record), how
many records it holds, and their bytes (keys and values)."""


class _AckedBytes:
    """One partition's acknowledged records, as the bytes of each acknowledgement by the
    offset of its last record; those before where storing reached are let go."""

    def __init__(self) -> None:
        self._ends: list[int] = []
        self._sizes: list[int] = []
        self._total = 0

    def add(self, end: int, size: int) -> None:
        at = bisect.bisect_left(self._ends, end)
        if at < len(self._ends) and self._ends[at] == end:
            return  # a batch other requests shared, acknowledged already
        self._ends.insert(at, end)
        self._sizes.insert(at, size)
        self._total += size

    def pending(self, reached: int) -> int:
        """Bytes acknowledged at or past ``reached`` (a batch partly stored counts whole)."""
        stored = bisect.bisect_left(self._ends, reached)
        if stored:
            self._total -= sum(self._sizes[:stored])
            del self._ends[:stored], self._sizes[:stored]
        return self._total


async def _shielded(futures: list[asyncio.Future[T]]) -> list[T]:
    """The results of futures other requests may await too: a request that gives up (its
    timeout) stops waiting without cancelling them for the others."""
    return await asyncio.gather(*(asyncio.shield(f) for f in futures))


def _take_exception(future: asyncio.Future[Any]) -> None:
    """Given to every future requests share when it is made: one that fails after each of
    its requests gave up (and answered 503) has its exception taken, not reported by asyncio
    as "never retrieved" when it is collected."""
    if not future.cancelled():
        future.exception()


def _build(batch: Any) -> None:
    """Encode and compress a closed batch, as the producer would when it sends it.

    Run in a thread, off the event loop: zstd (cramjam) releases the GIL, so the compression,
    4-5 us of CPU per 2 KB record, runs beside the requests and the worker instead of between
    them. aiokafka keeps the built buffer (``BatchBuilder._build`` builds once), so the
    producer's sender sends it as it is.
    """
    batch._build()


class _Lane:
    """One partition's records on their way to the producer, from every request at once.

    Records wait here while the batch before them is being handed over; the next turn hands
    all that gathered meanwhile, in batches as full as the producer takes. One client alone
    is sent at once (nothing lingers); several at once share batches, so the broker gets a few
    large batches instead of one small one per request per partition, which cost the
    embedded broker 35-60 us of CPU per record with requests of 100 items.

    Only this lane hands batches to its partition, one at a time: the producer queues one
    batch per partition and makes the others wait for it, and its wait loop (aiokafka 0.14
    ``add_batch``) subtracts the time since it first waited on every turn, so concurrent
    waiters gave up with KafkaTimeoutError long before the timeout.
    """

    def __init__(self, producer: Any, topic: str, partition: int) -> None:
        self._producer = producer
        self._topic = topic
        self._partition = partition
        self._waiting: list[tuple[bytes, bytes]] = []
        self._handed: asyncio.Future[list[Delivery]] | None = None
        self._sender: asyncio.Task[None] | None = None

    def add(self, records: list[tuple[bytes, bytes]]) -> asyncio.Future[list[Delivery]]:
        """Queue records (kept in order); the future gives the batches that carry them."""
        self._waiting += records
        if self._handed is None:
            self._handed = asyncio.get_running_loop().create_future()
            self._handed.add_done_callback(_take_exception)
        handed = self._handed
        if self._sender is None:
            self._sender = detached(self._send(), name=f"publish-{self._partition}")
        return handed

    async def _send(self) -> None:
        try:
            while self._waiting:
                records, self._waiting = self._waiting, []
                handed, self._handed = self._handed, None
                assert handed is not None
                try:
                    sent = await self._hand_over(records)
                except Exception as exc:  # every request whose records these were gets it
                    if not handed.done():
                        handed.set_exception(exc)
                else:
                    if not handed.done():
                        handed.set_result(sent)
        finally:
            self._sender = None

    async def _hand_over(self, records: list[tuple[bytes, bytes]]) -> list[Delivery]:
        sent: list[Delivery] = []
        batch, size = self._producer.create_batch(), 0
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                sent.append(await self._send_batch(batch, size))
                batch, size = self._producer.create_batch(), 0
                batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any
            size += len(key) + len(value)
        sent.append(await self._send_batch(batch, size))
        return sent

    async def _send_batch(self, batch: Any, size: int) -> Delivery:
        batch.close()  # a closed batch is sent without lingering, and no other record joins it
        await asyncio.to_thread(_build, batch)
        future = await self._producer.send_batch(batch, self._topic, partition=self._partition)
        future.add_done_callback(_take_exception)
        return future, batch.record_count(), size
