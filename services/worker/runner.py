"""The worker process: fetch from Kafka, push through the pipeline, commit, repeat.

Flushes and commits on partition revoke and at shutdown. ``drain`` is used by
``maniac serve``: it returns once every offset the gateway had acknowledged is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
)

from schemas import COMPLETIONS_INSERT_COLUMNS, COMPLETIONS_INSERT_TABLE
from services.common.clickhouse import ClickHouse, StringArray, rejects_data
from services.common.kafka import create_consumer
from services.common.logging import first_line
from services.common.losses import LossRepository
from services.common.metrics import (
    CONSUMER_LAG,
    WORKER_DEDUP_IDS,
    WORKER_GIVEN_UP,
    WORKER_INSERT_SECONDS,
    WORKER_KNOWN_IDS_BYTES,
)
from services.common.pricing import PriceCatalog
from services.common.settings import WorkerSettings
from services.worker.journal import InsertJournal
from services.worker.known import KnownIds, Scope, hashes, load_known
from services.worker.pipeline import Pipeline, ProcessPool, build_pipeline
from services.worker.pipeline.dead import dead_letter_headers, dead_letter_record
from services.worker.pipeline.steps import GivenUp, Retrying
from services.worker.pipeline.transform import datetime64
from services.worker.pipeline.types import Message, Partition, Processed

log = structlog.get_logger(__name__)

OFFSETS_WAIT_S = 15.0
"""How long a worker given every partition waits for the group's committed offsets."""

KNOWN_IDS_RETRY_S = 30.0
"""After the known ids failed to load, how long until a batch's lookup loads them again."""

YIELD_EVERY = 256
"""Records processed between two turns of the event loop: building a fetch's rows takes tens
of milliseconds per thousand records, which a gateway in the same process must not wait for."""


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))
        await self._worker.let_go()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
        await self._worker.rewind_if_given_up()
        await self._worker.load_known(
            trust_after_s=self._worker.partition_handover_s,
            scope=self._worker.scope_of(tp.partition for tp in assigned),
        )


def create_worker_consumer(bootstrap: str, settings: WorkerSettings) -> Any:
    """The consumer a worker reads with: the workers' group and its timeouts, from settings.

    It fetches at most a batch's bytes at a time: the worker holds the batch in flight, the
    one it fills, the rest of the last fetch, and the next fetch (which the consumer makes in
    the background), so each of them stays within ``MANIAC_BATCH_MAX_BYTES``."""
    return create_consumer(
        bootstrap,
        group_id=settings.consumer_group,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_max_bytes=settings.batch_max_bytes,
    )


async def stored_versions(clickhouse: ClickHouse, project: str, ids: list[str]) -> dict[str, int]:
    """The stored version (received_at, ms) of each of these completions that is stored.

    The newest ``received_at`` among a completion's rows is the version ``FINAL`` would keep
    (``ReplacingMergeTree(received_at)``); a retraction is a copy of an older version, stored
    with its replacement, so it never is the newest. Asked this way, without ``FINAL``, the
    rows are not merged across parts first: with ids that look random, as providers' ids do,
    a batch's ids fall into every granule of the project, and that merge made the lookup cost
    grow fast with the project (``python -m bench.dedup`` measures both ways).
    """
    rows = await clickhouse.rows(
        "SELECT completion_id, toUnixTimestamp64Milli(max(received_at)) "
        "FROM {database}.completions "
        "WHERE project = {project:String} AND completion_id IN {ids:Array(String)} "
        "GROUP BY completion_id",
        {"project": project, "ids": StringArray(ids)},
    )
    return {str(r[0]): int(r[1]) for r in rows}


_RETRACTION_COLUMNS = ", ".join(
    "toInt8(-1) AS agg_sign" if column == "agg_sign" else column
    for column in COMPLETIONS_INSERT_COLUMNS
)


async def retractions(clickhouse: ClickHouse, project: str, ids: list[str]) -> list[bytes]:
    """Rows (as :func:`insert_rows` takes them) that retract the stored versions of these
    completions: copies with ``agg_sign = -1``, written with the versions that replace them."""
    body = await clickhouse.json_compact(
        f"SELECT {_RETRACTION_COLUMNS} FROM {{database}}.completions FINAL "
        "WHERE project = {project:String} AND completion_id IN {ids:Array(String)}",
        {"project": project, "ids": StringArray(ids)},
    )
    return [line for line in body.split(b"\n") if line.strip()]


_PROJECT, _ID, _RECEIVED, _SIGN = (
    COMPLETIONS_INSERT_COLUMNS.index(column)
    for column in ("project", "completion_id", "received_at", "agg_sign")
)


def _received_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


async def unheld_rows(clickhouse: ClickHouse, body: bytes) -> list[bytes]:
    """Completion rows of ``body`` (not its retractions) that ``completions`` does not hold at
    their version or a newer one."""
    by_project: dict[str, list[tuple[str, int, bytes]]] = {}
    for line in body.split(b"\n"):
        if line.strip():
            values = orjson.loads(line)
            if values[_SIGN] == 1:
                found = (str(values[_ID]), _received_ms(values[_RECEIVED]), line)
                by_project.setdefault(str(values[_PROJECT]), []).append(found)
    unheld: list[bytes] = []
    for project, rows in by_project.items():
        stored = await stored_versions(clickhouse, project, [row[0] for row in rows])
        unheld += [line for completion_id, ms, line in rows if stored.get(completion_id, -1) < ms]
    return unheld


def restored_rows(lines: list[bytes]) -> bytes:
    """An insert that gives ``completions`` these rows and leaves every table its views fill as
    it is: each row after a retraction of itself, one millisecond older (so that the row is the
    version ``FINAL`` keeps)."""
    body: list[bytes] = []
    for line in lines:
        values = orjson.loads(line)
        values[_SIGN] = -1
        values[_RECEIVED] = datetime64((_received_ms(values[_RECEIVED]) - 1) / 1000)
        body += [orjson.dumps(values), line]
    return b"\n".join(body)


async def insert_rows(
    clickhouse: ClickHouse, body: bytes, *, table: str = COMPLETIONS_INSERT_TABLE
) -> None:
    """Insert completion rows (``Row.json`` lines, retractions among them) in one insert;
    the same body inserted again (a retry after a failure halfway, or an answer lost) is not
    written again anywhere it reached."""
    await clickhouse.insert_json_compact(table, COMPLETIONS_INSERT_COLUMNS, body, deduplicate=True)


async def insert_unfinished(clickhouse: ClickHouse, body: bytes) -> None:
    """Insert again ``body``, an insert a process killed on the embedded ClickHouse did not see
    through: the tables it reached drop it (the same body carries the same deduplication token),
    the others get it.

    A process killed as ``completions`` took the insert's part may have noted its token and
    lost the part: the insert again is then dropped there, while the other tables count it.
    Those rows are written again after retractions of themselves, which ``completions`` keeps
    and the other tables net to nothing (``unfinished_insert_restored``)."""
    await insert_rows(clickhouse, body)
    unheld = await unheld_rows(clickhouse, body)
    if unheld:
        log.warning("unfinished_insert_restored", rows=len(unheld))
        await insert_rows(clickhouse, restored_rows(unheld))


def _too_large(item: Processed, exc: Exception) -> None:
    log.error(
        "dead_letter_too_large_for_topic",
        partition=item.message.partition.partition,
        offset=item.message.offset,
        bytes=len(item.message.value or b""),
        error=repr(exc),
    )


class Worker:
    """One consumer in the workers' group, writing into one ClickHouse database."""

    def __init__(
        self,
        settings: WorkerSettings,
        consumer: Any,
        producer: Any,
        clickhouse: ClickHouse,
        *,
        prices: PriceCatalog | None = None,
        assign: bool = False,
        known: KnownIds | None = None,
        start_at: dict[int, int] | None = None,
        highwaters: dict[int, int] | None = None,
    ) -> None:
        """``assign``: read every partition of the topic without joining the group (offsets
        are still committed to it), for a worker that is the topic's only consumer, as in
        ``maniac serve`` on its embedded broker; a join there waits half a session timeout.

        ``known``: the completions known to be stored, from a worker this one replaces on
        the same partitions (which added everything it asked about); without it, this worker
        loads them (see :mod:`services.worker.known`).

        ``start_at``: with ``assign``, where to start reading partitions (partition -> offset)
        instead of at the group's committed offsets; committed at once, and counted as
        committed before that (see :meth:`stored_offsets`).

        ``highwaters``: with ``assign``, the high watermark of each partition (partition ->
        offset) as its broker, on durable storage, started. The broker numbers the next
        records from there: a committed offset of the group past it is of records the broker
        no longer has (it came back behind what it had acknowledged, an S3 write cut short
        by a crash), and the worker would wait past the new ones. It starts at the high
        watermark instead, committed at once (``committed_past_high_watermark``)."""
        self.settings = settings
        self._assign = assign
        self.topic = settings.topic
        self.dead_letter_topic = settings.dead_letter_topic
        self._consumer = consumer
        self._producer = producer
        self._clickhouse = clickhouse
        self._losses = LossRepository(clickhouse)
        self._stopping = asyncio.Event()
        self._detached = False
        self._detaching = asyncio.Event()
        self._lock = asyncio.Lock()
        self._first_offsets: dict[int, int] = {}
        self._start_at = dict(start_at or {})
        self._highwaters = dict(highwaters or {})
        self._known = known if settings.known_ids else None
        self._letting_go = False
        """Set while partitions are revoked: a failing step gives up instead of retrying."""
        self._revocations = 0
        """How many times partitions were revoked (see :meth:`_fetch`)."""
        self._fetched_at = time.monotonic()
        self._rewind_pending = False
        """A batch was given up while partitions were revoked: rewind those assigned next."""
        self._scope: Scope | None = None
        """The completions the known ids are loaded for (all when None)."""
        self._trusted_from = 0.0
        """Until then (monotonic), every id is asked of ClickHouse anyway."""
        self._known_retry_at: float | None = None
        """When (monotonic) to load the known ids again, after they failed to load."""
        self._pool = (
            ProcessPool(settings.worker_processes, prices) if settings.worker_processes else None
        )
        self._journal = InsertJournal.of(clickhouse)
        self._journaled: tuple[bytes, Path] | None = None
        """The body of the insert under way (tried, or to be tried again) and its entry."""
        self.pipeline: Pipeline = build_pipeline(
            insert=self._insert,
            dead_letter=self._dead_letter,
            record_dead=self._record_dead,
            commit=self._commit,
            lookup=self._lookup,
            retract=self._retract,
            prices=prices,
            max_rows=settings.batch_max_rows,
            max_ms=settings.batch_max_ms,
            max_bytes=settings.batch_max_bytes,
            retry_initial_s=settings.insert_retry_initial_s,
            retry_max_s=settings.insert_retry_max_s,
            stopping=self._stopping,
            give_up=self._give_up,
            offload=self._pool,
        )
        # counted as committed from now, not once positioned: if the broker dies before, the
        # revival that replaces this worker resumes there, not at the group's older offsets
        self.pipeline.commit.committed.update(
            {Partition(self.topic, p): o for p, o in self._start_at.items()}
        )

    # -- I/O the pipeline calls ------------------------------------------------------------

    async def _insert(self, body: bytes) -> None:
        journal = self._journal
        if journal is not None and (self._journaled is None or self._journaled[0] is not body):
            # An entry still held here is that of an insert that failed as the worker stopped
            # (stored or refused ones are ended, given up ones too): this is the batch after
            # it, salvaged. That insert may have reached some tables: its entry stays, for the
            # next start to see it through before its records are fetched again.
            self._journaled = (body, await asyncio.to_thread(journal.begin, body))
        started = time.perf_counter()
        try:
            await insert_rows(self._clickhouse, body)
        except Exception as exc:
            if rejects_data(exc):  # never stored as it is: split, or dead-lettered
                self._end_insert()
            raise
        self._end_insert()
        seconds = time.perf_counter() - started
        WORKER_INSERT_SECONDS.observe(seconds)
        log.debug("batch_inserted", bytes=len(body), ms=round(seconds * 1e3, 1))

    def _end_insert(self) -> None:
        """The insert under way is done with: stored, or given up (fetched again)."""
        if self._journal is not None and self._journaled is not None:
            self._journal.end(self._journaled[1])
        self._journaled = None

    async def finish_inserts(self) -> None:
        """Insert again what a worker on this embedded ClickHouse began inserting and did not
        see through (its process was killed): the tables it reached drop it (the same body
        carries the same deduplication token), the others get it. Done before anything is
        looked up or fetched, so the deduplication and the known ids see it stored."""
        if self._journal is None:
            return
        retrying = Retrying(
            self.settings.insert_retry_initial_s, self.settings.insert_retry_max_s, self._stopping
        )

        async def insert(body: bytes) -> None:
            await retrying.run(
                "insert_unfinished",
                partial(insert_unfinished, self._clickhouse, body),
                permanent=rejects_data,
            )

        await self._journal.finish(insert)

    async def _lookup(self, project: str, ids: list[str]) -> dict[str, int]:
        """The stored versions of these completions; ClickHouse is asked only about the ids
        whose hash the set of known ids holds (about all of them while there is no set)."""
        if self._known_retry_at is not None and time.monotonic() >= self._known_retry_at:
            await self._load_known()  # between batches: the one before this is stored
        known = self._known
        values = hashes(project, ids) if known is not None else None
        held = known.holds(values) if known is not None and values is not None else None
        asked = (
            known.maybe_stored(project, ids, values, held)
            if known is not None and self.trusts_known
            else ids
        )
        WORKER_DEDUP_IDS.labels("known_ids").inc(len(ids) - len(asked))
        WORKER_DEDUP_IDS.labels("clickhouse").inc(len(asked))
        stored = await stored_versions(self._clickhouse, project, asked) if asked else {}
        if known is not None and values is not None and held is not None:
            # those it does not hold yet (a completion delivered again is not held twice),
            # before they are inserted: never missing, at worst extra
            known.add_hashes(values[~held])
            WORKER_KNOWN_IDS_BYTES.set(known.nbytes)
        return stored

    @property
    def partition_handover_s(self) -> float:
        """How long a worker that lost partitions without knowing it yet may go on writing:
        until its session times out, and an insert it started then."""
        return 2 * self.settings.session_timeout_ms / 1000

    @property
    def known(self) -> KnownIds | None:
        return self._known

    @property
    def trusts_known(self) -> bool:
        """Whether an id the known set lacks is taken as new without asking ClickHouse."""
        return self._known is not None and time.monotonic() >= self._trusted_from

    def scope_of(self, assigned: Iterable[int]) -> Scope | None:
        """The completions of these partitions of the topic; None for all of them (or when
        the topic's partitions are not known)."""
        every = self._consumer.partitions_for_topic(self.topic) or set()
        mine = frozenset(assigned)
        return None if not every or mine >= every else Scope(len(every), mine)

    async def load_known(self, *, trust_after_s: float = 0.0, scope: Scope | None = None) -> None:
        """(Re)load the set of known ids from ClickHouse, between batches: on a worker's own
        partitions only it stores, so from then on it adds what it stores. Partitions taken
        over from another worker may still get a late write of that one's: for
        ``trust_after_s`` every id is asked anyway (and added). ``scope``: the completions of
        the worker's partitions, if it was not given all of them."""
        if not self.settings.known_ids:
            return
        async with self._lock:
            await self.pipeline.first.join()
            self._known = None
            self._scope = scope
            self._trusted_from = time.monotonic() + trust_after_s
            await self._load_known()

    async def _load_known(self) -> None:
        try:
            self._known = await load_known(self._clickhouse, self._scope)
        except Exception as exc:  # until they load, every id is asked: slower, never wrong
            self._known_retry_at = time.monotonic() + KNOWN_IDS_RETRY_S
            log.warning("known_ids_not_loaded", retry_in_s=KNOWN_IDS_RETRY_S, error=repr(exc))
        else:
            self._known_retry_at = None
        WORKER_KNOWN_IDS_BYTES.set(self._known.nbytes if self._known is not None else 0)

    async def _retract(self, project: str, ids: list[str]) -> list[bytes]:
        return await retractions(self._clickhouse, project, ids)

    async def _dead_letter(self, dead: list[Processed]) -> None:
        """Send the dead letters to the topic. One too large for it (a record another
        producer put into the completions topic, larger than this one may send, or than the
        broker takes with the headers) never will be: it stays in ``dead_letters`` only,
        where it was recorded first, and its partition moves on."""
        sent, futures = [], []
        for item in dead:
            try:
                future = await self._producer.send(
                    self.dead_letter_topic,
                    value=item.message.value,
                    key=item.message.key,
                    headers=dead_letter_headers(item),
                )
            except MessageSizeTooLargeError as exc:
                _too_large(item, exc)
            else:
                sent.append(item)
                futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = None
        for item, result in zip(sent, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):
                _too_large(item, result)
            elif isinstance(result, BaseException) and failed is None:
                failed = result
        if failed is not None:
            raise failed

    async def _record_dead(self, dead: list[Processed]) -> None:
        """Keep each dead letter in ClickHouse too, by project (counted once per source)."""
        now = datetime.now(UTC)
        await self._losses.record_dead_letters([dead_letter_record(d, now) for d in dead])

    async def _commit(self, offsets: dict[Partition, int]) -> None:
        if self._detached:
            return
        commit = asyncio.ensure_future(
            self._consumer.commit(
                {TopicPartition(p.topic, p.partition): o for p, o in offsets.items()}
            )
        )
        detaching = asyncio.ensure_future(self._detaching.wait())
        try:  # a commit waits for a broker that died until it is back: not once detached
            await asyncio.wait({commit, detaching}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            commit.cancel()  # it must not land later, on a broker started in its place
            raise
        finally:
            detaching.cancel()
        if not commit.done():
            commit.cancel()
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await commit
            return
        try:
            commit.result()
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on (rebalance): the rows are stored and the new owner will
            # re-deliver them; storage deduplicates, so nothing is lost or counted twice.
            log.warning("commit_skipped_after_rebalance", error=repr(exc))

    # -- giving a batch up ------------------------------------------------------------------

    def _give_up(self) -> str | None:
        """Why a failing step should stop retrying now, if it should.

        While its partitions are revoked, a worker must not write them any more: another one
        may be given them as soon as it lets go, and would not know about a late write. And a
        worker in a group that does not fetch for Kafka's max.poll.interval is dropped from
        it while still holding its batch, with the same risk once the write goes through.
        """
        if self._letting_go:
            return "revoked"
        if not self._assign and time.monotonic() - self._fetched_at >= (
            self.settings.give_up_after_s
        ):
            return "not_stored_in_time"
        return None

    async def _given_up(self, exc: GivenUp) -> None:
        """Drop what the pipeline holds; it is fetched again from the committed offsets."""
        WORKER_GIVEN_UP.labels(str(exc)).inc()
        self._end_insert()  # fetched again: never inserted again from here
        self.pipeline.first.discard()
        if self._letting_go:
            self._rewind_pending = True  # the partitions are going: rewind those given next
        else:
            await self._rewind()

    async def _rewind(self) -> None:
        """Fetch every assigned partition again from its committed offset."""
        while True:
            try:
                for tp in self._consumer.assignment():
                    offset = await self._consumer.committed(tp)
                    if offset is None:
                        await self._consumer.seek_to_beginning(tp)
                    else:
                        self._consumer.seek(tp, offset)
            except Exception as exc:  # the broker is gone too: fetching on would skip records
                if self._stopping.is_set():
                    return  # nothing more is fetched nor committed
                log.warning("rewind_failed", error=repr(exc))
                await asyncio.sleep(1.0)
            else:
                log.info("rewound", partitions=self.partitions)
                return

    async def _position(self) -> None:
        """Where a worker given every partition starts: at ``start_at`` (committed at once),
        else at the group's committed offsets (at ``highwaters`` where one is past it,
        committed at once), else at the beginning. Either way it counts as committed by this
        worker (what is pending, and where a revival resumes, start there).

        The beginning too when the committed offsets cannot be read in
        :data:`OFFSETS_WAIT_S`: Tansu on S3 storage fails every OffsetFetch for good once the
        group's offsets object is cut short (s3rver truncates an object it is sent again
        before the new one has arrived: a broker killed then leaves it empty). Reading from the
        beginning stores nothing twice (the worker skips what is stored), and committing that
        start writes the object whole again; until it has caught up, everything before counts
        as pending (register requests wait on the backlog limit).
        """
        start_at = dict(self._start_at)
        unread = [tp for tp in self._consumer.assignment() if tp.partition not in start_at]
        found: list[int | None] = [None] * len(unread)
        if unread:
            try:
                found = await asyncio.wait_for(
                    asyncio.gather(*(self._consumer.committed(tp) for tp in unread)),
                    OFFSETS_WAIT_S,
                )
            except TimeoutError:  # committed as it starts: the object is written whole again
                start_at |= {tp.partition: 0 for tp in unread}
                unread, found = [], []
                log.error("committed_offset_unreadable", partitions=sorted(start_at))
        past: dict[int, int] = {}
        for tp, offset in zip(unread, found, strict=True):
            highwater = self._highwaters.get(tp.partition)
            if offset is None:
                await self._consumer.seek_to_beginning(tp)
            elif highwater is not None and offset > highwater:
                past[tp.partition] = offset
                start_at[tp.partition] = highwater
            else:
                self._consumer.seek(tp, offset)
                self.pipeline.commit.committed[Partition(self.topic, tp.partition)] = offset
        if past:
            # committed, so stored (or dead-lettered) before the broker lost them: not lost
            log.error(
                "committed_past_high_watermark",
                committed=past,
                resumed_at={p: start_at[p] for p in past},
                stored_not_kept=sum(offset - start_at[p] for p, offset in past.items()),
            )
        if start_at:
            offsets = {TopicPartition(self.topic, p): o for p, o in start_at.items()}
            for tp, offset in offsets.items():
                self._consumer.seek(tp, offset)
            self.pipeline.commit.committed.update(
                {Partition(self.topic, p): o for p, o in start_at.items()}
            )
            await self._consumer.commit(offsets)
            log.warning("worker_positioned", offsets=start_at)

    async def rewind_if_given_up(self) -> None:
        if self._rewind_pending:
            self._rewind_pending = False
            await self._rewind()

    async def let_go(self) -> None:
        """Before the partitions are taken: store what is held, or give it up if it cannot
        be stored now (it is not written after this returns)."""
        self._revocations += 1
        self._letting_go = True
        try:
            async with self._lock:
                try:
                    await self.pipeline.first.join()
                except GivenUp as exc:
                    await self._given_up(exc)
        finally:
            self._letting_go = False

    # -- the loop ----------------------------------------------------------------------------

    async def flush(self) -> None:
        async with self._lock:
            await self.pipeline.first.join()

    async def run(self) -> None:
        """Consume until :meth:`stop`; then flush and commit what was fetched.

        What cannot be stored as it stops (ClickHouse failing: a step retried until then is
        tried once more) is not committed, and is fetched again by the next worker: said once,
        as ``worker_stopped_unstored``. A failure while it is not stopping is raised."""
        unstored: Exception | None = None
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await self._start()
            while not self._stopping.is_set():
                fetch = asyncio.ensure_future(self._fetch())
                # a fetch can hang while the broker is gone: stopping must not wait for it
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                fetched, revocations = fetch.result()
                self._fetched_at = time.monotonic()
                self._observe_lag()
                async with self._lock:
                    if revocations != self._revocations:
                        self._drop(fetched)
                        continue
                    try:
                        await self._submit(fetched)
                    except GivenUp as exc:
                        await self._given_up(exc)
        except Exception as exc:
            if not self._stopping.is_set():
                raise
            unstored = exc
        finally:
            try:
                await self.flush()
            except Exception as exc:  # held back, uncommitted: fetched again by the next worker
                if not self._stopping.is_set():
                    log.exception("final_flush_failed")
                unstored = unstored or exc
            stopping.cancel()
            if self._pool is not None:
                await asyncio.to_thread(self._pool.close)
            if unstored is not None and self._stopping.is_set():
                log.warning(
                    "worker_stopped_unstored",
                    committed=self.committed_offsets(),
                    error=first_line(unstored)[:300],
                )
            log.info("worker_stopped", committed=self.committed_offsets())

    async def _start(self) -> None:
        await self.finish_inserts()
        if self._assign:
            if not await self._unless_detached(self._take_every_partition()):
                return  # its broker is gone: it was stopped too
            if self._known is None:
                await self.load_known()
        else:
            self._consumer.subscribe([self.topic], listener=_FlushOnRevoke(self))
        if self._pool is not None:
            await self._pool.start()
        log.info(
            "worker_started",
            topic=self.topic,
            group=self.settings.consumer_group,
            processes=self.settings.worker_processes,
        )

    async def _take_every_partition(self) -> None:
        await self._consumer.topics()  # the topic's partitions, fresh
        partitions = sorted(self._consumer.partitions_for_topic(self.topic) or ())
        self._consumer.assign([TopicPartition(self.topic, p) for p in partitions])
        await self._position()

    async def _unless_detached(self, step: Coroutine[Any, Any, None]) -> bool:
        """Await a step that waits on the broker; False, the step cancelled, if the worker is
        detached first. Its broker is gone then: aiokafka waits for it to be back (a commit
        for its coordinator), which the revival detaching the worker does only after it."""
        task = asyncio.ensure_future(step)
        detaching = asyncio.ensure_future(self._detaching.wait())
        try:
            await asyncio.wait({task, detaching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            detaching.cancel()
            if not task.done():
                task.cancel()  # a commit must not land later, on a broker started in its place
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return False
        task.result()  # raises what the step raised
        return True

    async def _fetch(self) -> tuple[dict[Any, list[Any]], int]:
        """The next records, with the number of revocations when they came.

        The consumer returns records only of the partitions assigned then, but the worker
        takes them a turn of the event loop later, and the partitions may have been revoked
        meanwhile (let go, with nothing of these records held): some may be another worker's
        now, which stores them too, and a write of this one's would count them twice. Such
        records are dropped; the partitions this worker keeps are fetched again from their
        committed offsets, as after every rebalance.
        """
        fetched = await self._consumer.getmany(
            timeout_ms=50, max_records=self.settings.fetch_max_records
        )
        return fetched, self._revocations

    def _drop(self, fetched: dict[Any, list[Any]]) -> None:
        """Drop records fetched before the partitions were revoked (see :meth:`_fetch`)."""
        records = sum(len(r) for r in fetched.values())
        if records:
            partitions = sorted(tp.partition for tp, r in fetched.items() if r)
            log.info("fetch_dropped_after_revoke", records=records, partitions=partitions)

    async def _submit(self, fetched: dict[Any, list[Any]]) -> None:
        for tp, records in fetched.items():
            partition = Partition(tp.topic, tp.partition)
            if records:
                self._first_offsets.setdefault(tp.partition, records[0].offset)
            for n, record in enumerate(records, 1):
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let the gateway and queries run
                await self.pipeline.first.submit(
                    Message(partition, record.offset, record.key, record.value, record.timestamp)
                )
        await self.pipeline.first.poll()

    def _observe_lag(self) -> None:
        """Consumer lag per assigned partition: high watermark minus where storing reached."""
        for partition, lag in self._pending_by_partition().items():
            CONSUMER_LAG.labels(self.topic, str(partition)).set(lag)

    def pending(self, acked: dict[int, int] | None = None) -> int:
        """Records in the topic not yet stored, over this worker's partitions.

        The end of a partition is its high watermark as of the last fetch, or the gateway's
        last acknowledged offset + 1 (``acked``, from a gateway in the same process) when that
        is further.
        """
        return sum(self._pending_by_partition(acked).values())

    def reached(self) -> dict[int, int]:
        """Per partition of the topic, the next offset to store: committed, or stored since."""
        reached = {**self.pipeline.commit.committed, **self.pipeline.write.stored}
        return {p.partition: offset for p, offset in reached.items() if p.topic == self.topic}

    def _pending_by_partition(self, acked: dict[int, int] | None = None) -> dict[int, int]:
        reached = self.reached()
        highwaters: dict[int, int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp) if tp.topic == self.topic else None
            if highwater is not None:
                highwaters[tp.partition] = highwater
        ends = dict(highwaters)
        for p, offset in self._own(acked or {}).items():
            ends[p] = max(ends.get(p, 0), offset + 1)
        pending = {}
        for p, end in ends.items():
            done = reached.get(p)
            if done is None:
                # nothing stored by this worker yet: it started at its first fetched offset,
                # or, having fetched nothing from the partition, at its high watermark
                done = self._first_offsets.get(p, highwaters.get(p, 0))
            pending[p] = max(end - done, 0)
        return pending

    def stop(self) -> None:
        self._stopping.set()

    def detach(self) -> None:
        """Stop, storing what was fetched but committing nothing more: for a worker whose
        broker is gone (and whose offsets must not reach the one started in its place)."""
        self._detached = True
        self._detaching.set()
        self.stop()

    @property
    def partitions(self) -> list[int]:
        """The partitions of the topic this worker is given now."""
        return sorted(tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic)

    def committed_offsets(self) -> dict[int, int]:
        return {p.partition: o for p, o in self.pipeline.commit.committed.items()}

    def stored_offsets(self) -> dict[int, int]:
        """Per partition, where storing has reached: the offset after the last record stored
        (committed or not), else the first offset fetched (nothing stored since then)."""
        return {**self._first_offsets, **self.reached()}

    def _own(self, acked: dict[int, int]) -> dict[int, int]:
        """Of the acknowledged offsets, those of this worker's partitions: in a group, the
        others' are stored by the workers they are given. All of them while it has none (not
        yet joined, or between two assignments): it may be given any."""
        mine = set(self.partitions)
        if self._assign or not mine:
            return acked
        return {p: offset for p, offset in acked.items() if p in mine}

    async def drain(self, acked: dict[int, int], timeout_s: float) -> bool:
        """Wait until every acknowledged offset (partition -> last offset) of this worker's
        partitions is committed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = self.committed_offsets()
            if all(committed.get(p, 0) > offset for p, offset in self._own(acked).items()):
                return True
            await asyncio.sleep(0.05)
        log.error("drain_timed_out", acked=acked, committed=self.committed_offsets())
        return False
