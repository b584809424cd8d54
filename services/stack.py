"""Gateway, workers and query service in one process, on a given broker and ClickHouse.

``maniac serve`` runs this on the embedded defaults; the end-to-end tests run it on the test
session's broker and engine. Shutdown drains: the HTTP server stops taking requests first,
then the worker runs until every offset the gateway acknowledged is committed.

On its own embedded broker, the stack watches the broker every second. On memory storage,
which keeps every record for its life, it starts the broker afresh whenever its memory passes
``MANIAC_BROKER_MAX_MEMORY_MB`` (:meth:`Stack.restart_broker`): publishing is held, everything
acknowledged is stored, the dead letters are carried over, and publishing resumes on the empty
broker. A broker that died is started again (:meth:`Stack.revive_broker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any

import structlog
from fastapi import FastAPI

from services.common.app import create_base_app
from services.common.auth import KeyStore
from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker, broker_reachable, read_topic
from services.common.losses import LossRepository
from services.common.metrics import BROKER_RESTARTS, WORKER_FAILURES
from services.common.pricing import PriceCatalog
from services.common.ratelimit import RateLimiter
from services.common.runtime import SERVE_PARTITIONS, prepare_clickhouse, prepare_topics
from services.common.settings import ServeSettings
from services.gateway.dead_letters import router as dead_letters_router
from services.gateway.endpoints import router as gateway_router
from services.gateway.publisher import Publisher
from services.gateway.services import Gateway
from services.query.endpoints import router as query_router
from services.query.repository import CompletionsRepository
from services.query.status import router as status_router
from services.query.usage import UsageRepository
from services.query.usage import router as usage_router
from services.worker.pipeline.dead import letter_headers
from services.worker.runner import Worker, create_worker_consumer

log = structlog.get_logger(__name__)


RESTART_DRAIN_S = 10.0
"""How long a broker restart holds publishing for the worker to store what was acknowledged
before it gives up (and publishing resumes on the broker as it is)."""

RESTART_RETRY_S = 60.0
"""After a restart given up, how long until the next attempt."""

DeadLetterRecord = tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int]
"""A dead-letter topic record: key, value, headers, timestamp (ms)."""

DEAD_LETTER_PAGE_ROWS = 10_000
DEAD_LETTER_PAGE_BYTES = 16 * 1024 * 1024
"""Dead letters written back to the embedded broker from ClickHouse are read in pages of at
most this many, and this many bytes of payloads (one larger is a page of its own)."""


async def _one_page(
    records: Sequence[DeadLetterRecord],
) -> AsyncIterator[Sequence[DeadLetterRecord]]:
    yield records


WORKER_REVIVE_S = 1.0
"""Wait before starting the worker again after it stopped on an error (and between tries)."""


class _PlannedRestarts(logging.Filter):
    """aiokafka's client logs, as errors, every failed connection to the broker and the
    metadata it could not update. While ``maniac serve`` restarts its own broker on purpose,
    its clients cannot reach it for that moment by design (the restart is logged as
    ``broker_restarted``): those records are dropped then, and only then."""

    EXPECTED = ("Unable connect to", "Unable to update metadata")

    def __init__(self) -> None:
        super().__init__()
        self.under_way = 0

    def filter(self, record: logging.LogRecord) -> bool:
        expected = isinstance(record.msg, str) and record.msg.startswith(self.EXPECTED)
        return not (self.under_way and expected)

    @contextlib.contextmanager
    def planned(self) -> Iterator[None]:
        self.under_way += 1
        try:
            yield
        finally:
            self.under_way -= 1


_PLANNED_RESTARTS = _PlannedRestarts()
logging.getLogger("aiokafka").addFilter(_PLANNED_RESTARTS)  # aiokafka/client.py logs here


async def bounded(work: Awaitable[Any], seconds: float, what: str) -> None:
    """Await a shutdown step, but never hang on it (a dead broker must not block exit)."""
    try:
        async with asyncio.timeout(seconds):
            await work
    except TimeoutError:
        log.error("shutdown_step_timed_out", step=what, seconds=seconds)
    except Exception as exc:
        log.error("shutdown_step_failed", step=what, error=repr(exc))
    except asyncio.CancelledError:
        # raised inside the step (aiokafka's consumer, stopped after its broker died, awaits
        # tasks of its own that were cancelled), unless this task itself is being cancelled
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.error("shutdown_step_failed", step=what, error="CancelledError")


def resume_after_crash(
    stored: dict[int, int], acked: dict[int, int], kept: dict[int, int]
) -> tuple[dict[int, int], int]:
    """Where a worker resumes on a durable broker that crashed, by partition, and how many
    acknowledged records are lost.

    ``stored``: where storing had reached (the offset after the last record stored);
    ``acked``: the last offset the gateway had acknowledged; ``kept``: the high watermark the
    broker came back with. Records up to ``kept`` are still there; the broker numbers new
    ones from ``kept``, so a worker past it would wait past the new records: it starts at
    ``kept`` then. Acknowledged records at or past both ``kept`` and ``stored`` are gone.
    """
    start_at = {p: min(offset, kept.get(p, 0)) for p, offset in stored.items()}
    lost = sum(
        max(0, last + 1 - max(kept.get(p, 0), stored.get(p, 0))) for p, last in acked.items()
    )
    return start_at, lost


class Stack:
    def __init__(
        self,
        settings: ServeSettings,
        clickhouse: ClickHouse,
        bootstrap: str,
        *,
        broker: EmbeddedBroker | None = None,
        create_dev_key: bool = False,
    ) -> None:
        """``broker``: the embedded broker behind ``bootstrap``, when the stack has its own;
        the worker is then its only consumer and reads without joining a group."""
        self.settings = settings
        self.broker = broker
        self.create_dev_key = create_dev_key
        self.clickhouse = clickhouse
        self.reads = clickhouse.another_connection()
        """The query service's own client: list and get never wait behind the worker's inserts."""
        self.bootstrap = bootstrap
        self.keys: KeyStore | None = None
        self.publisher: Publisher | None = None
        self.worker: Worker | None = None
        self.gateway: Gateway | None = None
        self._consumer: Any = None
        self._worker_task: asyncio.Task[None] | None = None
        self._prices: PriceCatalog | None = None
        self._restarting = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._reviving: asyncio.Task[None] | None = None
        self.dead_letter_bytes = 0
        """Memory the dead letters written back to the embedded broker took when it last
        started (measured around writing them): no restart gives it back, so it counts beyond
        the broker's memory limit."""

    async def start(self) -> None:
        s = self.settings
        self.keys = await prepare_clickhouse(
            self.clickhouse, s, apply_migrations=True, keys_client=self.reads
        )
        if self.create_dev_key and s.api_keys is None and await self.keys.count() == 0:
            key = await self.keys.create("default")
            print(  # noqa: T201 - shown once, on purpose, to the person who started the server
                f"\nNo API keys configured: created a development key for project 'default':\n"
                f"\n    {key}\n\nIt is stored only as a hash; keep it now.\n",
                flush=True,
            )
        await prepare_topics(self.bootstrap, s, partitions=SERVE_PARTITIONS)
        self.gateway = await Gateway.start(s, self.bootstrap, self.clickhouse)
        self.publisher = self.gateway.publisher
        if self.broker is not None and self.broker.on_memory:
            await self._restore_dead_letters()
        self._prices = PriceCatalog.load(s.pricing_file)
        # the group's offsets were committed to the broker before it last stopped
        await self._start_worker(highwaters=self._kept())
        self.publisher.limit_backlog(self.pending, s.max_backlog)
        self.publisher.limit_backlog_bytes(self.pending_bytes, s.max_backlog_bytes)
        if self.broker is not None:
            self._watcher = asyncio.create_task(self._watch_broker(self.broker), name="broker")

    async def _start_worker(
        self,
        *,
        resuming: Worker | None = None,
        start_at: dict[int, int] | None = None,
        highwaters: dict[int, int] | None = None,
    ) -> None:
        """``resuming``: a worker on the same broker that stopped on an error; what it
        committed is where this one starts (not where the group's offsets may say, after a
        revival positioned it), and counts as stored (the drain, the backlog).
        ``start_at``: where to start otherwise; ``highwaters``: where the broker numbers the
        next records as it started, for the first worker on it (see :class:`Worker`)."""
        assert self.gateway is not None
        if resuming is not None:
            start_at = resuming.committed_offsets()
        self._consumer = create_worker_consumer(self.bootstrap, self.settings)
        await self._consumer.start()
        self.worker = Worker(
            self.settings,
            self._consumer,
            self.gateway.producer,
            self.clickhouse,
            prices=self._prices,
            assign=self.broker is not None,
            # the worker before it on the same partitions (the stack's own broker) added
            # every id it asked about, even those of an insert still running when it stopped
            known=self.worker.known if self.worker is not None and self.broker else None,
            start_at=start_at,
            highwaters=highwaters,
        )
        if resuming is not None:
            self.worker.pipeline.commit.committed.update(resuming.pipeline.commit.committed)
        self._worker_task = asyncio.create_task(self.worker.run(), name="worker")
        self._worker_task.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker that stopped on an error (a child of its process pool killed, say) is
        started again from the committed offsets: the gateway keeps acknowledging, and what it
        acknowledges must still be stored."""
        if task.cancelled() or task.exception() is None or self._closing:
            return
        WORKER_FAILURES.inc()
        log.error("worker_failed", error=repr(task.exception()))
        self._reviving = asyncio.create_task(self._revive_worker(task), name="worker-revive")

    async def _revive_worker(self, failed: asyncio.Task[None]) -> None:
        while not self._closing:
            await asyncio.sleep(WORKER_REVIVE_S)
            async with self._restarting:
                if self._closing or self._worker_task is not failed:
                    return  # stopping, or a broker restart started a worker already
                try:
                    await bounded(self._consumer.stop(), 10, "consumer_stop")
                    await self._start_worker(resuming=self.worker)
                except Exception as exc:
                    log.error("worker_revive_failed", error=repr(exc))
                    continue
                log.warning("worker_revived")
                return

    async def _detach_worker(self) -> None:
        """Stop a worker whose broker is gone: it stores what it fetched, but commits nothing
        (a commit would wait on the dead broker, and must not reach the one started in its
        place: offsets of the old log would skip records of the new). Cancelled if it cannot
        finish in 10 s (a dead letter waits on the broker, say)."""
        task = self._worker_task
        if self.worker is not None:
            self.worker.detach()
        if task is None:
            return
        await asyncio.wait({task}, timeout=10.0)
        if not task.done():
            log.error("worker_detach_timed_out", seconds=10.0)
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.warning("worker_detached_with_error", error=repr(task.exception()))

    async def _stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self._worker_task is not None:
            await bounded(self._worker_task, 15, "worker_stop")
        if self._consumer is not None:
            await bounded(self._consumer.stop(), 10, "consumer_stop")

    # -- the embedded broker: it is started again when it exits, or passes its memory -------

    def memory_restart_due(self, used: int | None) -> bool:
        """Whether the embedded broker, holding ``used`` bytes, is to start afresh: past
        ``MANIAC_BROKER_MAX_MEMORY_MB`` (``0``: never) beyond the dead letters it was given
        back when it started, which a restart writes back again: counted in the limit, dead
        letters of tens of MB past it had the broker started afresh every few seconds, holding
        publishing each time, for nothing given back."""
        limit = self.settings.broker_max_memory_mb * 1024 * 1024
        return bool(limit) and used is not None and used > limit + self.dead_letter_bytes

    def _kept(self) -> dict[int, int]:
        """Of the topic, each partition's high watermark as the stack's own broker on
        durable storage last started: what it kept of what it had acknowledged. Empty on
        memory storage (it starts empty) and on a broker of others' (an external Kafka
        answers an offset past a partition's end as out of range, and the consumer reads the
        partition again from its beginning: ``auto_offset_reset``)."""
        if self.broker is None or self.broker.on_memory:
            return {}
        return {
            tp.partition: end
            for tp, end in self.broker.highwaters.items()
            if tp.topic == self.settings.topic
        }

    async def _watch_broker(self, broker: EmbeddedBroker) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if broker.down:
                    await self.revive_broker()
                    continue
                used = broker.memory_bytes()
                if not broker.on_memory or not self.memory_restart_due(used):
                    continue
                restarted = await self.restart_broker(reason="memory", memory_bytes=used)
            except Exception as exc:
                log.error("broker_restart_failed", error=repr(exc))
                restarted = False
            if not restarted:  # the worker cannot store now: do not hold publishing again soon
                await asyncio.sleep(RESTART_RETRY_S)

    async def revive_broker(self) -> None:
        """Start the embedded broker again after it exited by itself (crashed, killed).

        Whatever it held on memory storage is gone: the records acknowledged and not yet
        stored are logged as lost. S3 storage keeps them, and the worker resumes where storing
        had reached; unless the broker comes back with less than it acknowledged (its high
        watermark behind, as when an S3 write was cut short by the crash): those records are
        logged as lost too, and the worker starts at the high watermark, where the broker
        numbers the next records, instead of waiting past them. Publishes in flight fail, and
        their clients get a 503 to retry.
        """
        broker, publisher = self.broker, self.publisher
        if broker is None or publisher is None or self.worker is None:
            raise RuntimeError("only a started stack on its own embedded broker revives it")
        async with self._restarting:
            code = broker.exit_code
            publisher.pause()
            start_at: dict[int, int] | None = None
            kept: dict[int, int] | None = None
            try:
                acked = dict(publisher.acked)
                await self._detach_worker()  # it stores what it had fetched
                stored = self.worker.stored_offsets()
                lost = unstored = self.worker.pending(acked)
                try:
                    publisher.restart_offsets()
                    await asyncio.to_thread(broker.restart)
                    await bounded(self._consumer.stop(), 10, "consumer_stop")
                    await prepare_topics(self.bootstrap, self.settings, partitions=SERVE_PARTITIONS)
                    if broker.on_memory:
                        await self._restore_dead_letters()
                    else:
                        kept = self._kept()
                        start_at, lost = resume_after_crash(stored, acked, kept)
                finally:
                    # kept: where the group's offsets are of records it no longer has too
                    await self._start_worker(start_at=start_at, highwaters=kept)
            finally:
                publisher.resume()
            BROKER_RESTARTS.labels("exited").inc()
            log.error(
                "broker_revived",
                exit_code=code,
                storage=broker.storage,
                unstored_records=unstored,
                lost=lost,
                resumed_at=start_at,
            )

    async def restart_broker(self, *, reason: str, memory_bytes: int | None = None) -> bool:
        """Start the embedded broker afresh, losing nothing it was sent; False if not now.

        1. Hold publishing, and wait for what was handed to the producer to be acknowledged.
        2. Wait until the worker stored and committed everything acknowledged. If it cannot
           in :data:`RESTART_DRAIN_S` (ClickHouse down, say), resume and keep the broker.
        3. Stop the worker, read the dead-letter topic, restart the broker (its memory
           storage starts empty, offsets from 0), create the topics, write the dead letters
           back with their headers and timestamps (their identity, see migration 0012).
        4. Start a new worker, forget the acknowledged offsets, resume publishing.
        """
        broker, publisher, gateway = self.broker, self.publisher, self.gateway
        if broker is None or publisher is None or gateway is None:
            raise RuntimeError("only a started stack on its own embedded broker restarts it")
        # a replay reads the dead-letter topic and publishes: it finishes first (and the
        # lock is taken before publishing is held, which the replay may be waiting for)
        async with self._restarting, gateway.replayer.lock:
            started = time.monotonic()
            publisher.pause()
            try:
                await publisher.settle()
                assert self.worker is not None
                acked = dict(publisher.acked)
                if not await self.worker.drain(acked, RESTART_DRAIN_S):
                    log.error("broker_restart_skipped", reason="not drained", acked=acked)
                    return False
                drained = time.monotonic()
                with _PLANNED_RESTARTS.planned():
                    await self._stop_worker()
                    try:
                        kept = await self._replace_broker(broker, publisher, gateway.producer)
                    finally:
                        await self._start_worker()  # on the old log still, if it failed before
            finally:
                publisher.resume()
            BROKER_RESTARTS.labels(reason).inc()
            log.info(
                "broker_restarted",
                reason=reason,
                memory_mb=None if memory_bytes is None else round(memory_bytes / 2**20),
                records=sum(o + 1 for o in acked.values()),
                dead_letters_kept=kept,
                drain_ms=round((drained - started) * 1e3),
                held_ms=round((time.monotonic() - started) * 1e3),
            )
            return True

    async def _restore_dead_letters(self) -> int:
        """The embedded broker on memory storage starts empty, after a restart of `maniac
        serve` or a crash of its own: the dead letters not replayed yet are written back to its
        dead-letter topic from ClickHouse, which keeps each one's payload, key and identity, so
        that they can still be replayed. Read and written a page at a time: however many the
        table holds, at most :data:`DEAD_LETTER_PAGE_BYTES` of them are held at once. How many."""
        assert self.gateway is not None
        pages = LossRepository(self.clickhouse).unreplayed_dead_letters(
            max_rows=DEAD_LETTER_PAGE_ROWS, max_bytes=DEAD_LETTER_PAGE_BYTES
        )
        records = (
            [
                (
                    letter.message_key or None,
                    letter.payload,
                    letter_headers(letter),
                    int(letter.dead_at.timestamp() * 1000),
                )
                for letter in page
            ]
            async for page in pages
        )
        count = await self._send_dead_letters(self.gateway.producer, records)
        if count:
            log.info("dead_letters_restored", count=count)
        return count

    async def _send_dead_letters(
        self, producer: Any, pages: AsyncIterable[Sequence[DeadLetterRecord]]
    ) -> int:
        """Write dead letters to the dead-letter topic as they were (key, value, headers,
        timestamp: their identity), a page at a time; return how many, once the broker
        acknowledged every one."""
        before = self.broker.memory_bytes() if self.broker is not None else None
        count = 0
        async for records in pages:
            sends = [
                await producer.send(
                    self.settings.dead_letter_topic,
                    key=key,
                    value=value,
                    headers=headers,
                    timestamp_ms=timestamp_ms,
                )
                for key, value, headers, timestamp_ms in records
            ]
            await asyncio.gather(*sends)
            count += len(records)
        after = self.broker.memory_bytes() if self.broker is not None else None
        # measured: the broker holds more than their bytes, by an amount of its own
        self.dead_letter_bytes = max(0, after - before) if after and before else 0
        return count

    async def _replace_broker(
        self, broker: EmbeddedBroker, publisher: Publisher, producer: Any
    ) -> int:
        """Restart the broker, empty, with the same topics and dead letters; how many."""
        dead = await read_topic(self.bootstrap, self.settings.dead_letter_topic)
        await asyncio.to_thread(broker.restart)
        publisher.restart_offsets()  # a new log from offset 0, whatever fails from here
        await prepare_topics(self.bootstrap, self.settings, partitions=SERVE_PARTITIONS)
        records = [(r.key, r.value, list(r.headers or ()), r.timestamp) for r in dead]
        return await self._send_dead_letters(producer, _one_page(records))

    async def stop(self) -> None:
        """Drain what the gateway acknowledged into ClickHouse, then stop everything."""
        self._closing = True
        if self._reviving is not None:
            async with self._restarting:  # a worker being started again is, first
                self._reviving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reviving
        if self._watcher is not None:
            async with self._restarting:  # a restart under way finishes first
                self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.publisher is not None:
            await self.publisher.flush()
        if self.worker is not None and self.publisher is not None:
            task = self._worker_task
            if task is not None and not task.done():
                drained = await self.worker.drain(
                    dict(self.publisher.acked), self.settings.drain_timeout_s
                )
                log.info("drained", ok=drained, acked=self.publisher.acked)
        await self._stop_worker()
        if self.gateway is not None:
            await bounded(self.gateway.stop(), 45, "gateway_stop")
        self.reads.close()

    def pending(self) -> int:
        """Acknowledged records not yet stored (all projects: partitions mix them)."""
        if self.worker is None:
            return 0
        acked = dict(self.publisher.acked) if self.publisher is not None else {}
        return self.worker.pending(acked)

    def pending_bytes(self) -> int:
        """Bytes of the records acknowledged and not yet stored (keys and values)."""
        if self.worker is None or self.publisher is None:
            return 0
        return self.publisher.pending_bytes(self.worker.reached())

    def create_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
            await self.start()
            try:
                yield {
                    "settings": self.settings,
                    "keys": self.keys,
                    "rate_limiter": RateLimiter(self.settings.rate_limit_per_minute),
                    **(self.gateway.state() if self.gateway else {}),
                    "completions": CompletionsRepository(self.reads),
                    "usage": UsageRepository(self.reads),
                    "losses": LossRepository(self.reads),
                    "pending": self.pending,
                    "readiness": {
                        "broker": lambda: broker_reachable(self.bootstrap),
                        "clickhouse": self.reads.ping,
                    },
                }
            finally:
                await self.stop()

        return create_base_app(
            "Maniac Inference Gateway API",
            lifespan,
            [gateway_router, dead_letters_router, query_router, usage_router, status_router],
        )
