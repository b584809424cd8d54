"""The worker's steps, in the order messages go through them.

Each step holds the next one and passes work forward with ``submit``; ``poll`` lets time-based
steps act when no message arrives; ``join`` pushes everything held through to the end (on
partition revoke and at shutdown). The commit step is always last, so an offset is committed
only after ClickHouse accepted the rows before it and dead letters were acknowledged. A step
given up (:class:`GivenUp`) commits nothing; ``discard`` then drops what the first step holds,
to be fetched again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol, TypeVar

import structlog

from schemas import COMPLETIONS_INSERT_COLUMNS
from schemas.events import split_key
from services.common.clickhouse import rejects_data
from services.common.codec import loads
from services.common.logging import first_line
from services.common.metrics import (
    INGESTION_LAG,
    PROJECT_DEAD,
    PROJECT_DUPLICATES,
    PROJECT_STORED,
    WORKER_BATCH_ROWS,
    WORKER_DEAD,
    WORKER_DUPLICATES,
    WORKER_RETRIES,
    WORKER_ROWS,
    project_label,
)
from services.worker.pipeline.dead import reason_of
from services.worker.pipeline.types import Batch, Invalid, Message, Partition, Processed, Row

log = structlog.get_logger(__name__)

_ID = COMPLETIONS_INSERT_COLUMNS.index("completion_id")
"""Where a row (a retraction as ClickHouse gives it) has its completion's id."""

T = TypeVar("T")


class Step(Protocol):
    async def submit(self, message: Message) -> None: ...
    async def poll(self) -> None: ...
    async def join(self) -> None: ...


class BatchSink(Protocol):
    async def submit(self, batch: Batch) -> None: ...


class OffsetSink(Protocol):
    async def submit(self, offsets: dict[Partition, int]) -> None: ...


def process_safely(
    process: Callable[[bytes | None], Row | Invalid], value: bytes | None
) -> Row | Invalid:
    """``process(value)``, with an exception turned into a dead letter.

    The step is pure: the same message would fail the same way on every retry, and letting
    the exception escape would stop the worker and the partition with it.
    """
    try:
        return process(value)
    except Exception as exc:
        log.exception("process_failed")
        return Invalid(f"unprocessable: {exc!r}")


class ProcessAndBatch:
    """Runs the pure per-message function and gathers results into batches.

    A batch is handed on when it holds ``max_rows`` messages or ``max_bytes`` of them (their
    values), or its first message is ``max_ms`` old; a message that would take it past
    ``max_bytes`` goes into the next one (so one larger than that makes a batch of its own).
    Records may be of megabytes each (a registered item with images inline): counted in rows
    only, a batch of them held gigabytes, twice over (its records and its rows), and once more
    as the insert's body. It is then written while the next one is fetched and processed (so the
    insert, which ClickHouse runs outside the GIL, overlaps with building the next batch's
    rows), but at most one batch is in flight: the next hand-over waits for it, and raises
    what writing it raised (as does the first ``poll`` after it ended). That wait is the
    backpressure that stops the runner from fetching more than it can store. The steps after
    this one see batches in order, and ``join`` waits for the one in flight.

    With ``offload``, messages are held as they come and the whole batch is processed by it
    (in child processes) when the batch is handed on; the batch is the same.
    """

    def __init__(
        self,
        process: Callable[[bytes | None], Row | Invalid],
        next_step: BatchSink,
        *,
        max_rows: int,
        max_ms: int,
        max_bytes: int,
        offload: Callable[[list[bytes | None]], Awaitable[list[Row | Invalid]]] | None = None,
    ) -> None:
        self._process = process
        self._offload = offload
        self._next = next_step
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_s = max_ms / 1000.0
        self._batch = Batch()
        self._held: list[Message] = []
        self._writing: asyncio.Future[None] | None = None

    async def submit(self, message: Message) -> None:
        size = len(message.value or b"")
        if self._batch.offsets and self._batch.bytes + size > self._max_bytes:
            await self._flush()
        batch = self._batch
        if not batch.offsets:
            batch.first_ms = time.monotonic()
        batch.bytes += size
        if self._offload is not None:
            self._held.append(message)
        else:
            self._add(batch, message, process_safely(self._process, message.value))
        batch.offsets[message.partition] = message.offset + 1
        if len(batch) + len(self._held) >= self._max_rows or batch.bytes >= self._max_bytes:
            await self._flush()

    @staticmethod
    def _add(batch: Batch, message: Message, result: Row | Invalid) -> None:
        if isinstance(result, Row):
            batch.rows.append(result)
            batch.sources[(result.project, result.completion_id)] = message
        else:
            batch.dead.append(Processed(message, result))

    async def poll(self) -> None:
        if self._writing is not None and self._writing.done():
            await self._written()  # what writing it raised surfaces now, not at the next batch
        if self._batch.offsets and time.monotonic() - self._batch.first_ms >= self._max_s:
            await self._flush()

    async def join(self) -> None:
        """Write what is held, and wait for it and the batch before it.

        When the batch before failed (on the way out, say: a dead letter for a broker that is
        gone), what is held is still stored, as a salvage batch, and the failure raised after:
        on `maniac serve`'s memory broker those records are nowhere else. A batch given up is
        never followed by a write (its partitions may be another worker's now).
        """
        failed: Exception | None = None
        try:
            await self._written()
        except GivenUp:
            raise
        except Exception as exc:
            failed = exc
        if self._batch.offsets:
            self._batch.salvage = failed is not None
            await self._flush()
        try:
            await self._written()
        except Exception as exc:
            if failed is None:
                failed = exc
            else:  # the salvage batch failed too: said here, the first failure raised
                log.error("salvage_batch_failed", error=repr(exc))
        if failed is not None:
            raise failed

    def discard(self) -> None:
        """Drop what is held, after the batch in flight was given up (:class:`GivenUp`): the
        messages after it must not be committed before it, so they are fetched again too."""
        self._batch = Batch()
        self._held = []
        self._writing = None

    async def _written(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def _flush(self) -> None:
        batch, self._batch = self._batch, Batch()
        held, self._held = self._held, []
        if held and self._offload is not None:
            results = await self._offload([m.value for m in held])
            for message, result in zip(held, results, strict=True):
                self._add(batch, message, result)
        await self._written()
        self._writing = asyncio.ensure_future(self._next.submit(batch))


class GivenUp(Exception):
    """A failing step was given up (see :class:`Retrying`): what the pipeline holds is not
    stored, nor its offsets committed; the worker drops it and fetches it again."""


class Retrying:
    """Retries a transient failure with exponential backoff until it succeeds, we stop, or
    ``give_up`` names a reason to stop trying (then :class:`GivenUp`, with no attempt after
    the reason came up: a worker whose partitions are being taken must not write them)."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        stopping: asyncio.Event,
        give_up: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stopping = stopping
        self.give_up = give_up

    async def run(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        *,
        permanent: Callable[[Exception], bool] | None = None,
    ) -> T:
        """``call()`` until it succeeds; an error ``permanent`` recognises is raised at once."""
        delay = self.initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except Exception as exc:
                if permanent is not None and permanent(exc):
                    raise
                if self.stopping.is_set():  # said by the worker as it stops
                    raise
                if (reason := self.give_up()) is None:
                    log.warning(
                        "retrying", what=what, attempt=attempt, delay_s=delay, error=repr(exc)
                    )
                    WORKER_RETRIES.labels(what).inc()
                    reason = await self._pause(delay)
                if reason is not None:
                    log.warning(
                        "given_up", what=what, reason=reason, attempts=attempt, error=repr(exc)
                    )
                    raise GivenUp(reason) from exc
                delay = min(delay * 2, self.max_s)

    async def _pause(self, delay: float) -> str | None:
        """Wait ``delay``, or less if a reason to give up comes up meanwhile (returned), or
        we stop (one last attempt then, at once)."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0 and not self.stopping.is_set():
            await asyncio.sleep(min(left, 0.1))
            if (reason := self.give_up()) is not None:
                return reason
        return None


Lookup = Callable[[str, list[str]], Awaitable[dict[str, int]]]
Retract = Callable[[str, list[str]], Awaitable[list[bytes]]]


class Deduplicate:
    """Counts each completion once, whatever is delivered or registered twice.

    Within the batch only the newest version of a completion is kept. A completion already
    stored with the same or a newer version is dropped (a re-delivery: the row and the
    aggregates have it), and so is any later version of one whose id is its content's hash
    (a retry: the same item, received again). One stored with an older version is replaced:
    a retraction of the stored version (``agg_sign = -1``) goes into the same insert as the
    new version, so the aggregates move from the old values to the new ones. This is
    race-free because all records of a completion share a partition, and a partition has one
    consumer at a time.
    """

    def __init__(
        self, lookup: Lookup, retract: Retract, retrying: Retrying, next_step: BatchSink
    ) -> None:
        self._lookup = lookup
        self._retract = retract
        self._retrying = retrying
        self._next = next_step

    async def submit(self, batch: Batch) -> None:
        newest: dict[tuple[str, str], Row] = {}
        received: dict[str, int] = {}
        for row in batch.rows:
            received[row.project] = received.get(row.project, 0) + 1
            key = (row.project, row.completion_id)
            held = newest.get(key)
            if held is None or row.version_ms > held.version_ms and not row.content_id:
                newest[key] = row
        by_project: dict[str, list[str]] = {}
        for project, completion_id in newest:
            by_project.setdefault(project, []).append(completion_id)
        kept: list[Row] = []
        retractions: list[Row] = []
        for project, ids in by_project.items():
            stored = await self._retrying.run("dedup_lookup", partial(self._lookup, project, ids))
            replaced = []
            for completion_id in ids:
                row = newest[(project, completion_id)]
                version = stored.get(completion_id)
                if version is None:
                    kept.append(row)
                elif row.version_ms > version and not row.content_id:
                    kept.append(row)
                    replaced.append(completion_id)
            if replaced:
                old = await self._retrying.run(
                    "dedup_retract", partial(self._retract, project, replaced)
                )
                retractions += [
                    Row(line, project, loads(line)[_ID], retraction=True) for line in old
                ]
        skipped = len(batch.rows) - len(kept)
        if skipped:
            WORKER_DUPLICATES.inc(skipped)
            for row in kept:
                received[row.project] -= 1
            for project, n in received.items():
                if n:
                    PROJECT_DUPLICATES.labels(project_label(project)).inc(n)
        batch.rows = retractions + kept
        await self._next.submit(batch)


def observe_stored(rows: list[Row], now_s: float) -> None:
    """Per-project stored counts and ingestion lag (gateway receipt -> inserted)."""
    lags: dict[str, list[float]] = {}
    for row in rows:
        if not row.retraction:
            lags.setdefault(row.project, []).append(max(now_s - row.version_ms / 1000.0, 0.0))
    for project, values in lags.items():
        label = project_label(project)
        PROJECT_STORED.labels(label).inc(len(values))
        histogram = INGESTION_LAG.labels(label)
        for value in values:
            histogram.observe(value)


def observe_dead(dead: list[Processed]) -> None:
    WORKER_DEAD.inc(len(dead))
    for item in dead:
        PROJECT_DEAD.labels(project_label(split_key(item.message.key)[0])).inc()
        log.warning(
            "dead_lettered",
            reason=reason_of(item),
            partition=item.message.partition.partition,
            offset=item.message.offset,
        )


class WriteBatch:
    """Bulk-inserts the rows, sends the dead letters and records them, then hands the offsets on.

    Each of the three is retried on its own, so a failure to record a dead letter never sends
    it to the topic twice; the offsets move on only after all three succeeded.
    """

    def __init__(
        self,
        insert: Callable[[bytes], Awaitable[None]],
        dead_letter: Callable[[list[Processed]], Awaitable[None]],
        record_dead: Callable[[list[Processed]], Awaitable[None]],
        retrying: Retrying,
        next_step: OffsetSink,
    ) -> None:
        self._insert = insert
        self._dead_letter = dead_letter
        self._record_dead = record_dead
        self._retrying = retrying
        self._next = next_step
        self.stored: dict[Partition, int] = {}
        """Per partition, the offset after the last batch stored (committed or not)."""

    async def submit(self, batch: Batch) -> None:
        started = time.perf_counter()
        if batch.rows:
            stored = await self._store(batch.rows, batch)
            WORKER_ROWS.inc(len(stored))
            WORKER_BATCH_ROWS.observe(len(stored))
            observe_stored(stored, time.time())
        if batch.dead:  # kept in ClickHouse first: there even if the topic cannot be reached
            await self._retrying.run("dead_letter_record", lambda: self._record_dead(batch.dead))
            if not batch.salvage:
                await self._retrying.run("dead_letter", lambda: self._dead_letter(batch.dead))
                observe_dead(batch.dead)
        log.debug(
            "batch_written",
            rows=len(batch.rows),
            dead=len(batch.dead),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if batch.salvage:  # one after a failed batch: the records before it are not stored
            log.warning("batch_salvaged", rows=len(batch.rows), dead=len(batch.dead))
            return
        self.stored.update(batch.offsets)
        await self._next.submit(batch.offsets)

    async def _insert_rows(self, rows: list[Row]) -> None:
        body = b"\n".join(row.json for row in rows)
        await self._retrying.run("insert", lambda: self._insert(body), permanent=rejects_data)

    async def _store(self, rows: list[Row], batch: Batch) -> list[Row]:
        """Insert ``rows``; return those stored.

        When ClickHouse refuses them for their data, the rows are halved (by completion) and
        each half stored the same way; a completion refused on its own becomes a dead letter
        (its message, with ClickHouse's reason), so one bad row never blocks its partition. A
        completion's rows (a retraction and its new version) stay in one insert: both are
        stored or neither.
        """
        try:
            await self._insert_rows(rows)
        except Exception as exc:
            if not rejects_data(exc):
                raise
            log.warning("insert_rejected", rows=len(rows), error=_first_line(exc))
            completions = _by_completion(rows)
            if len(completions) == 1:
                source = batch.sources.get((rows[-1].project, rows[-1].completion_id))
                if source is None:  # no message to dead-letter: never drop a row silently
                    raise
                reason = f"rejected by ClickHouse: {_first_line(exc)}"
                batch.dead.append(Processed(source, Invalid(reason)))
                return []
            half = len(completions) // 2
            first = [row for completion in completions[:half] for row in completion]
            second = [row for completion in completions[half:] for row in completion]
            return await self._store(first, batch) + await self._store(second, batch)
        return rows


def _by_completion(rows: list[Row]) -> list[list[Row]]:
    grouped: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.project, row.completion_id), []).append(row)
    return list(grouped.values())


def _first_line(exc: Exception) -> str:
    return first_line(exc)[:300]


class CommitOffsets:
    """Last step: commit offset + 1 per partition, and remember what is committed."""

    def __init__(
        self,
        commit: Callable[[dict[Partition, int]], Awaitable[None]],
        retrying: Retrying,
    ) -> None:
        self._commit = commit
        self._retrying = retrying
        self.committed: dict[Partition, int] = {}

    async def submit(self, offsets: dict[Partition, int]) -> None:
        await self._retrying.run("commit", lambda: self._commit(offsets))
        self.committed.update(offsets)
