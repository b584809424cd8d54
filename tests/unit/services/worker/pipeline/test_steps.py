"""Batching, ordering of insert -> dead letter -> commit, and retry without commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest
from prometheus_client import REGISTRY

from schemas import COMPLETIONS_INSERT_COLUMNS
from services.common.metrics import project_label
from services.common.pricing import PriceCatalog
from services.worker.pipeline import (
    Offload,
    Pipeline,
    ProcessPool,
    build_pipeline,
    process,
    processor,
)
from services.worker.pipeline.steps import (
    CommitOffsets,
    GivenUp,
    ProcessAndBatch,
    Retrying,
    WriteBatch,
)
from services.worker.pipeline.types import Invalid, Message, Partition, Processed, Row

P0 = Partition("t", 0)
P1 = Partition("t", 1)


class Recorder:
    """The I/O the pipeline calls, recorded in order; inserts can be made to fail."""

    def __init__(self, failures: int = 0, record_failures: int = 0) -> None:
        self.calls: list[tuple[str, object]] = []
        self.failures = failures
        self.record_failures = record_failures
        self.stored: dict[tuple[str, str], int] = {}
        self.inserted: list[bytes] = []

    async def insert(self, body: bytes) -> None:
        if self.failures:
            self.failures -= 1
            self.calls.append(("insert_failed", body.count(b"\n") + 1))
            raise ConnectionError("ClickHouse unavailable")
        self.calls.append(("insert", body.count(b"\n") + 1))
        self.inserted = body.split(b"\n")

    async def dead_letter(self, dead: list[Processed]) -> None:
        self.calls.append(("dead_letter", [d.message.offset for d in dead]))

    async def record_dead(self, dead: list[Processed]) -> None:
        if self.record_failures:
            self.record_failures -= 1
            self.calls.append(("record_dead_failed", [d.message.offset for d in dead]))
            raise ConnectionError("ClickHouse unavailable")
        self.calls.append(("record_dead", [d.message.offset for d in dead]))

    async def commit(self, offsets: dict[Partition, int]) -> None:
        self.calls.append(("commit", dict(offsets)))

    async def lookup(self, project: str, ids: list[str]) -> dict[str, int]:
        return {i: v for (p, i), v in self.stored.items() if p == project and i in ids}

    async def retract(self, project: str, ids: list[str]) -> list[bytes]:
        self.calls.append(("retract", sorted(ids)))
        return [b'["%s","%s",-1]' % (project.encode(), i.encode()) for i in sorted(ids)]


def _pipeline(
    recorder: Recorder,
    max_rows: int = 3,
    max_ms: int = 10_000,
    *,
    max_bytes: int = 1 << 30,
    offload: Offload | None = None,
    stopping: asyncio.Event | None = None,
    retry_s: float = 0.001,
    give_up: Callable[[], str | None] = lambda: None,
) -> Pipeline:
    return build_pipeline(
        insert=recorder.insert,
        dead_letter=recorder.dead_letter,
        record_dead=recorder.record_dead,
        commit=recorder.commit,
        lookup=recorder.lookup,
        retract=recorder.retract,
        prices=None,
        max_rows=max_rows,
        max_ms=max_ms,
        max_bytes=max_bytes,
        retry_initial_s=retry_s,
        retry_max_s=2 * retry_s,
        stopping=stopping or asyncio.Event(),
        give_up=give_up,
        offload=offload,
    )


def _valid(partition: Partition, offset: int, cid: str | None = None, version: int = 1) -> Message:
    value = (
        b'{"v":1,"kind":"register","project":"p","container":"c","completion_id":"%s",'
        b'"received_at_ms":%d,"item":{"input":{"messages":[]}}}'
        % ((cid or f"id{offset}").encode(), version)
    )
    return Message(partition, offset, b"k", value)


def _poison(partition: Partition, offset: int) -> Message:
    return Message(partition, offset, b"k", b"not json")


async def test_full_batch_is_inserted_then_committed() -> None:
    rec = Recorder()
    pipeline = _pipeline(rec)
    for offset in range(3):
        await pipeline.first.submit(_valid(P0, offset))
    await asyncio.sleep(0.01)  # handed on when full: written without a join
    assert rec.calls == [("insert", 3), ("commit", {P0: 3})]


async def test_the_next_batch_is_built_while_one_is_written_but_only_one_is_in_flight() -> None:
    rec = Recorder()
    gate = asyncio.Event()
    insert = rec.insert

    async def slow_insert(body: bytes) -> None:
        await gate.wait()
        await insert(body)

    rec.insert = slow_insert  # type: ignore[method-assign]
    pipeline = _pipeline(rec)
    for offset in range(3):  # the first batch: handed on, its write waits at the gate
        await pipeline.first.submit(_valid(P0, offset))
    for offset in range(3, 5):  # the next batch is built meanwhile
        await pipeline.first.submit(_valid(P0, offset))
    third = asyncio.ensure_future(pipeline.first.submit(_valid(P0, 5)))  # fills it
    await asyncio.sleep(0.02)
    assert not third.done()  # its hand-over waits for the batch in flight
    assert rec.calls == []
    gate.set()
    await third
    await pipeline.first.join()
    assert rec.calls == [("insert", 3), ("commit", {P0: 3}), ("insert", 3), ("commit", {P0: 6})]


async def test_partial_batch_waits_for_time_or_join() -> None:
    rec = Recorder()
    pipeline = _pipeline(rec, max_ms=20)
    await pipeline.first.submit(_valid(P0, 7))
    await pipeline.first.poll()
    assert rec.calls == []
    await asyncio.sleep(0.03)
    await pipeline.first.poll()
    await asyncio.sleep(0.01)
    assert rec.calls == [("insert", 1), ("commit", {P0: 8})]


async def test_dead_letters_are_sent_before_commit_and_do_not_block_partition() -> None:
    rec = Recorder()
    pipeline = _pipeline(rec, max_rows=10)
    await pipeline.first.submit(_valid(P0, 0))
    await pipeline.first.submit(_poison(P0, 1))
    await pipeline.first.submit(_valid(P1, 5))
    await pipeline.first.join()
    assert rec.calls == [
        ("insert", 2),
        ("record_dead", [1]),
        ("dead_letter", [1]),
        ("commit", {P0: 2, P1: 6}),
    ]
    assert pipeline.commit.committed == {P0: 2, P1: 6}


async def test_failed_dead_letter_record_is_retried_before_the_topic_and_the_commit() -> None:
    rec = Recorder(record_failures=2)
    pipeline = _pipeline(rec, max_rows=1)
    await pipeline.first.submit(_poison(P0, 4))
    await pipeline.first.join()
    assert rec.calls == [
        ("record_dead_failed", [4]),
        ("record_dead_failed", [4]),
        ("record_dead", [4]),  # kept in ClickHouse first: there even if the topic is not
        ("dead_letter", [4]),  # sent to the topic once, not again on each retry
        ("commit", {P0: 5}),
    ]


async def test_a_message_the_process_step_fails_on_is_dead_lettered_not_raised() -> None:
    rec = Recorder()
    reasons: list[str] = []

    async def dead_letter(dead: list[Processed]) -> None:
        reasons.extend(d.result.reason for d in dead if isinstance(d.result, Invalid))
        await rec.dead_letter(dead)

    def process(value: bytes | None) -> Row | Invalid:
        if value == b"boom":
            raise TypeError("Integer exceeds 64-bit range")
        return Row(value or b"")

    retrying = Retrying(0.001, 0.002, asyncio.Event())
    commit = CommitOffsets(rec.commit, retrying)
    write = WriteBatch(rec.insert, dead_letter, rec.record_dead, retrying, next_step=commit)
    first = ProcessAndBatch(process, next_step=write, max_rows=3, max_ms=10_000, max_bytes=1 << 30)
    for offset, value in enumerate([b"{}", b"boom", b"{}"]):
        await first.submit(Message(P0, offset, b"k", value))
    await first.join()
    assert rec.calls == [
        ("insert", 2),
        ("record_dead", [1]),
        ("dead_letter", [1]),
        ("commit", {P0: 3}),
    ]
    assert reasons == ["unprocessable: TypeError('Integer exceeds 64-bit range')"]


async def test_failed_insert_is_retried_and_nothing_committed_before_it_succeeds() -> None:
    rec = Recorder(failures=2)
    pipeline = _pipeline(rec, max_rows=1)
    await pipeline.first.submit(_valid(P0, 0))
    await pipeline.first.join()
    assert rec.calls == [
        ("insert_failed", 1),
        ("insert_failed", 1),
        ("insert", 1),
        ("commit", {P0: 1}),
    ]


async def test_failure_while_stopping_is_raised_not_committed() -> None:
    rec = Recorder(failures=100)
    stopping = asyncio.Event()
    stopping.set()
    pipeline = _pipeline(rec, max_rows=1, max_ms=10, stopping=stopping)
    await pipeline.first.submit(_valid(P0, 0))
    with pytest.raises(ConnectionError):
        await pipeline.first.join()
    assert [c[0] for c in rec.calls] == ["insert_failed"]
    assert pipeline.commit.committed == {}


async def test_a_failing_write_is_given_up_once_there_is_a_reason_and_tried_no_more() -> None:
    """No attempt after the reason came up, even in the middle of a long wait between two;
    nothing is committed, and what the first step held is dropped on discard."""
    rec = Recorder(failures=100)
    reason: list[str] = []
    pipeline = _pipeline(
        rec,
        max_rows=1,
        retry_s=60.0,  # the first wait would outlast the test
        give_up=lambda: reason[0] if reason else None,
    )
    await pipeline.first.submit(_valid(P0, 0))
    await asyncio.sleep(0.05)  # the insert failed and waits to be tried again
    asyncio.get_running_loop().call_later(0.1, reason.append, "revoked")
    started = time.monotonic()
    with pytest.raises(GivenUp, match="revoked"):
        # the next batch waits for the first to be written: it is given up instead
        await pipeline.first.submit(_valid(P0, 1, "second"))
    assert time.monotonic() - started < 1.0
    assert [c[0] for c in rec.calls] == ["insert_failed"]
    assert pipeline.commit.committed == {}
    pipeline.first.discard()
    await pipeline.first.join()  # nothing held any more
    assert [c[0] for c in rec.calls] == ["insert_failed"]


async def test_stopping_in_the_middle_of_a_wait_between_attempts_ends_it() -> None:
    """One last attempt at once, then the failure is raised: a shutdown does not wait out
    the backoff (up to ``MANIAC_INSERT_RETRY_MAX_S``)."""
    rec = Recorder(failures=100)
    stopping = asyncio.Event()
    pipeline = _pipeline(rec, max_rows=1, retry_s=60.0, stopping=stopping)
    await pipeline.first.submit(_valid(P0, 0))
    await asyncio.sleep(0.05)  # the insert failed and waits to be tried again
    asyncio.get_running_loop().call_later(0.1, stopping.set)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await pipeline.first.join()
    assert time.monotonic() - started < 5.0
    assert [c[0] for c in rec.calls] == ["insert_failed", "insert_failed"]
    assert pipeline.commit.committed == {}


async def test_a_write_that_failed_is_raised_by_the_next_poll_without_new_messages() -> None:
    rec = Recorder(failures=100)
    stopping = asyncio.Event()
    stopping.set()
    pipeline = _pipeline(rec, max_rows=1, stopping=stopping)
    await pipeline.first.submit(_valid(P0, 0))
    await asyncio.sleep(0.01)  # the write has failed by now
    with pytest.raises(ConnectionError):
        await pipeline.first.poll()
    assert pipeline.commit.committed == {}


async def test_redelivered_and_older_versions_are_not_written_again() -> None:
    rec = Recorder()
    rec.stored = {("p", "seen"): 5, ("p", "newer-stored"): 9}
    pipeline = _pipeline(rec, max_rows=10)
    await pipeline.first.submit(_valid(P0, 0, "seen", version=5))  # re-delivery
    await pipeline.first.submit(_valid(P0, 1, "newer-stored", version=3))  # late old version
    await pipeline.first.submit(_valid(P0, 2, "fresh", version=1))
    await pipeline.first.submit(_valid(P0, 3, "fresh", version=1))  # twice in one batch
    await pipeline.first.join()
    assert rec.calls == [("insert", 1), ("commit", {P0: 4})]
    assert rec.inserted[0].startswith(b'["p","fresh",')


async def test_a_newer_version_is_written_with_a_retraction_of_the_stored_one() -> None:
    rec = Recorder()
    rec.stored = {("p", "changed"): 5}
    pipeline = _pipeline(rec, max_rows=10)
    await pipeline.first.submit(_valid(P0, 0, "changed", version=6))
    await pipeline.first.submit(_valid(P0, 1, "changed", version=7))  # newest in batch wins
    await pipeline.first.join()
    assert rec.calls == [("retract", ["changed"]), ("insert", 2), ("commit", {P0: 2})]
    assert rec.inserted[0] == b'["p","changed",-1]'
    received_at = orjson.loads(rec.inserted[1])[COMPLETIONS_INSERT_COLUMNS.index("received_at")]
    assert received_at == "1970-01-01 00:00:00.007"


_STORED_AND_LAG = (
    "maniac_project_records_stored_total",
    "maniac_ingestion_lag_seconds_count",
    "maniac_ingestion_lag_seconds_sum",
)


def _samples() -> list[float]:
    label = {"project": project_label("p")}
    return [REGISTRY.get_sample_value(name, label) or 0.0 for name in _STORED_AND_LAG]


async def test_a_retraction_is_neither_counted_as_stored_nor_timed() -> None:
    rec = Recorder()
    rec.stored = {("p", "changed"): 5}
    pipeline = _pipeline(rec, max_rows=10)
    before = _samples()
    await pipeline.first.submit(_valid(P0, 0, "changed", version=int(time.time() * 1000)))
    await pipeline.first.join()
    assert rec.calls[1] == ("insert", 2)  # the retraction and the new version
    stored, timed, lag = (after - was for after, was in zip(_samples(), before, strict=True))
    assert (stored, timed) == (1, 1)
    assert 0 <= lag < 60  # not the age of a version of 0 ms (a retraction's)


async def _offloaded(values: list[bytes | None]) -> list[Row | Invalid]:
    await asyncio.sleep(0)  # as a process pool would: the loop runs meanwhile
    return [process(v) for v in values]


@pytest.mark.parametrize("offload", [None, _offloaded], ids=["in-process", "offloaded"])
async def test_processing_elsewhere_gives_the_same_batches(offload: Offload | None) -> None:
    rec = Recorder()
    pipeline = _pipeline(rec, offload=offload)
    for message in [_valid(P0, 0), _poison(P0, 1), _valid(P1, 5), _valid(P0, 2)]:
        await pipeline.first.submit(message)
    await pipeline.first.join()
    assert rec.calls == [
        ("insert", 2),
        ("record_dead", [1]),
        ("dead_letter", [1]),
        ("commit", {P0: 2, P1: 6}),
        ("insert", 1),
        ("commit", {P0: 3}),
    ]


async def test_a_process_pool_builds_the_rows_the_worker_would() -> None:
    values: list[bytes | None] = [_valid(P0, n).value for n in range(5)]
    values += [_poison(P0, 5).value, None]
    pool = ProcessPool(2, PriceCatalog.load())
    try:
        await pool.start()
        assert await pool(values) == [processor(PriceCatalog.load())(v) for v in values]
        assert await pool([]) == []
    finally:
        pool.close()


async def test_an_offloaded_batch_that_cannot_be_written_raises_at_join() -> None:
    rec = Recorder(failures=100)
    stopping = asyncio.Event()
    stopping.set()
    pipeline = _pipeline(rec, max_rows=1, max_ms=10, offload=_offloaded, stopping=stopping)
    await pipeline.first.submit(_valid(P0, 0))
    with pytest.raises(ConnectionError):
        await pipeline.first.join()
    assert [c[0] for c in rec.calls] == ["insert_failed"]
    assert pipeline.commit.committed == {}


class Rejecting(Recorder):
    """ClickHouse as it answers an insert holding a row it cannot parse: all refused."""

    async def insert(self, body: bytes) -> None:
        if b',"bad' in body:  # a row of a completion "bad...", or its retraction
            self.calls.append(("insert_rejected", body.count(b"\n") + 1))
            raise RuntimeError("Code: 41. DB::Exception: Cannot read DateTime: (at row 1)")
        await super().insert(body)


async def test_rows_clickhouse_rejects_are_isolated_and_dead_lettered() -> None:
    rec = Rejecting()
    pipeline = _pipeline(rec, max_rows=4)
    for offset, cid in enumerate(["a", "bad", "c", "d"]):
        await pipeline.first.submit(_valid(P0, offset, cid))
    await pipeline.first.join()
    assert rec.calls == [
        ("insert_rejected", 4),  # not retried: the same rows would be refused again
        ("insert_rejected", 2),  # halves: [a, bad] and [c, d]
        ("insert", 1),  # a
        ("insert_rejected", 1),  # bad, alone: a dead letter
        ("insert", 2),  # c, d
        ("record_dead", [1]),
        ("dead_letter", [1]),
        ("commit", {P0: 4}),
    ]


async def test_a_retraction_is_never_split_from_its_new_version() -> None:
    rec = Rejecting()
    rec.stored[("p", "bad-changed")] = 1  # stored before with version 1: retracted now
    pipeline = _pipeline(rec, max_rows=2)
    await pipeline.first.submit(_valid(P0, 0, "bad-changed", version=2))
    await pipeline.first.submit(_valid(P0, 1, "ok"))
    await pipeline.first.join()
    inserts = [c for c in rec.calls if c[0].startswith("insert")]
    # the retraction and the new version are refused together, and neither is stored
    assert inserts == [("insert_rejected", 3), ("insert_rejected", 2), ("insert", 1)]
    assert len(rec.inserted) == 1
    assert rec.inserted[0].startswith(b'["p","ok",')
    assert rec.calls[-3:] == [("record_dead", [0]), ("dead_letter", [0]), ("commit", {P0: 2})]


def _sized(offset: int, size: int) -> Message:
    """A valid message of ``size`` bytes (its item's text makes up the rest)."""
    head = (
        b'{"v":1,"kind":"register","project":"p","container":"c","completion_id":"id%d",'
        b'"received_at_ms":1,"item":{"input":{"messages":[]},"tags":["' % offset
    )
    tail = b'"]}}'
    return Message(P0, offset, b"k", head + b"x" * (size - len(head) - len(tail)) + tail)


@pytest.mark.parametrize("offload", [None, _offloaded], ids=["in_process", "offloaded"])
async def test_a_batch_is_bounded_in_bytes_and_a_larger_record_is_a_batch_of_its_own(
    offload: Offload | None,
) -> None:
    rec = Recorder()
    pipeline = _pipeline(rec, max_rows=100, max_bytes=10_000, offload=offload)
    # 3 + 3 fill 6 KB; the next would pass 10 KB: a new batch. 12 KB alone is one batch.
    sizes = [3_000, 3_000, 3_000, 3_000, 3_000, 12_000, 1_000, 9_000, 500]
    for offset, size in enumerate(sizes):
        await pipeline.first.submit(_sized(offset, size))
    await pipeline.first.join()
    assert [c for c in rec.calls if c[0] == "insert"] == [
        ("insert", 3),  # 9,000 bytes: a fourth would make 12,000
        ("insert", 2),  # 6,000: the next is larger than the bound alone
        ("insert", 1),  # 12,000: a batch of its own
        ("insert", 2),  # 1,000 + 9,000: exactly the bound, handed on at once
        ("insert", 1),  # what is left, at join
    ]
    assert pipeline.commit.committed == {P0: len(sizes)}
