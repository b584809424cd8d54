"""The worker against the real broker and the real ClickHouse engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import pytest
import structlog.testing
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

from schemas.events import encode_event, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker, create_consumer, ensure_topics, partitions_of
from services.common.settings import ServeSettings, WorkerSettings
from services.worker import runner
from services.worker.known import STORED_HASHES, Scope, load_known
from services.worker.pipeline.types import Message, Partition
from services.worker.runner import Worker, create_worker_consumer, stored_versions
from tests.conftest import Broker, eventually
from tests.support.worker import (
    RunningWorker,
    _Commits,
    all_committed,
    all_committed_by,
    completions_away,
    count,
    count_is,
    counted,
    event,
    produce,
    store,
)


async def test_valid_messages_are_stored_once_and_offsets_committed(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    messages = [event(f"id-{i}") for i in range(50)]
    await produce(producer, settings.topic, messages + messages[:10])  # 10 delivered twice
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: count_is(clickhouse, 50))
        await eventually(lambda: all_committed(worker, 60))
    assert await counted(clickhouse) == (50, 50, 50)
    raw = await clickhouse.rows("SELECT count() FROM {database}.completions")
    assert raw[0][0] == 50  # the re-deliveries were not written again


async def test_poison_message_goes_to_dead_letter_and_partition_moves_on(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    key = b"p/poison"
    await produce(
        producer,
        settings.topic,
        [event("before"), (key, b"{not json"), event("bad", created="nope"), event("after")],
    )
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: count_is(clickhouse, 2))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {"before", "after"}

    consumer = create_consumer(broker.bootstrap, group_id="dlq-reader", session_timeout_ms=2000)
    await consumer.start()
    consumer.subscribe([settings.dead_letter_topic])
    dead: list[Any] = []
    try:
        for _ in range(100):
            fetched = await consumer.getmany(timeout_ms=200, max_records=10)
            dead += [r for rs in fetched.values() for r in rs]
            if len(dead) == 2:
                break
    finally:
        await consumer.stop()
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert reasons[0].startswith("not JSON")
    assert "output.created" in reasons[1]
    assert {r.value for r in dead} >= {b"{not json"}
    assert all(dict(r.headers)["source_topic"].decode() == settings.topic for r in dead)


async def test_values_clickhouse_cannot_hold_are_dead_lettered_not_retried_forever(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    # Before: a spend beyond Decimal(38, 12) failed the insert on every retry (the partition
    # stalled), and a token count beyond 64 bits raised in the worker and stopped it.
    huge_tokens = {"prompt_tokens": 1e30, "completion_tokens": 0, "total_tokens": 0}
    messages = [
        event("before"),
        event("huge-spend", spend=1e30),
        event("huge-tokens", usage=huge_tokens),
        event("after"),
    ]
    await produce(producer, settings.topic, messages)
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: count_is(clickhouse, 2))
        await eventually(lambda: all_committed(worker, 4))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {"before", "after"}


async def test_a_new_worker_resumes_from_committed_offsets(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    await produce(producer, settings.topic, [event(f"first-{i}") for i in range(5)])
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 5))
    await clickhouse.command("TRUNCATE TABLE {database}.completions")
    await produce(producer, settings.topic, [event(f"second-{i}") for i in range(3)])
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: count_is(clickhouse, 3))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {f"second-{i}" for i in range(3)}


async def test_a_worker_assigned_every_partition_stores_and_commits_to_its_group(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """As in `maniac serve` on its own broker: no group join, offsets still in the group."""
    await produce(producer, settings.topic, [event(f"first-{i}") for i in range(20)])
    async with RunningWorker(settings, broker, clickhouse, assign=True) as worker:
        await eventually(lambda: count_is(clickhouse, 20))
        await eventually(lambda: all_committed(worker, 20))
    await produce(producer, settings.topic, [event(f"second-{i}") for i in range(5)])
    async with RunningWorker(settings, broker, clickhouse, assign=True) as worker:
        await eventually(lambda: count_is(clickhouse, 25))  # resumed where the first stopped
        await asyncio.sleep(0.5)
    assert await count(clickhouse) == 25
    # a worker joining the group reads from the offsets the assigned ones committed: one read
    # from the start would skip the 25 stored again as duplicates
    duplicates = _duplicates()
    async with RunningWorker(settings, broker, clickhouse):
        await produce(producer, settings.topic, [event("third")])
        await eventually(lambda: count_is(clickhouse, 26))
    assert _duplicates() == duplicates


async def test_insert_failures_are_retried_without_commit_then_resume(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    async with completions_away(clickhouse) as back:
        await produce(producer, settings.topic, [event(f"id-{i}") for i in range(5)])
        retries = _store_retries()
        async with RunningWorker(settings, broker, clickhouse) as worker:

            async def retrying() -> bool:
                return _store_retries() >= retries + 2

            await eventually(retrying)
            assert worker.committed_offsets() == {}  # failed twice, nothing committed
            await back()
            await eventually(lambda: count_is(clickhouse, 5))
            await eventually(lambda: all_committed(worker, 5))


def _duplicates() -> float:
    return REGISTRY.get_sample_value("maniac_worker_duplicates_skipped_total") or 0.0


def _store_retries() -> float:
    """Retries of the steps that fail while ``completions`` is away: its lookup, its insert."""
    return sum(
        REGISTRY.get_sample_value("maniac_worker_retries_total", {"what": what}) or 0.0
        for what in ("dedup_lookup", "insert")
    )


async def _dead_letters(ch: ClickHouse) -> list[tuple[Any, ...]]:
    rows = await ch.rows(
        "SELECT project, completion_id, reason, source_topic, source_partition, source_offset, "
        "payload, message_key, source_timestamp "
        "FROM {database}.dead_letters FINAL ORDER BY completion_id"
    )
    return [tuple(r) for r in rows]


async def test_a_message_too_large_for_the_dead_letter_topic_is_kept_and_committed(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse
) -> None:
    """A record larger than the worker's producer may send (another producer, with a higher
    limit, put it there) can never reach the dead-letter topic: it is kept in
    ``dead_letters``, with its bytes and reason, and the partition moves on instead of
    retrying the topic for ever."""
    big = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, max_request_size=32 * 2**20, enable_idempotence=False
    )
    await big.start()
    try:
        huge = b"x" * (9 * 2**20)  # over the 8 MB the worker's producer may send, below
        await big.send_and_wait(settings.topic, key=b"p/huge", value=huge, partition=0)
        await produce(big, settings.topic, [event("after")])
    finally:
        await big.stop()
    running = RunningWorker(settings, broker, clickhouse, max_record_bytes=8 * 2**20)
    async with running as worker:
        await eventually(lambda: all_committed(worker, 2), timeout_s=20)
    assert await count(clickhouse) == 1
    [(project, completion_id, reason, size)] = await clickhouse.rows(
        "SELECT project, completion_id, reason, length(payload) FROM {database}.dead_letters FINAL"
    )
    assert (project, completion_id, size) == ("p", "huge", len(huge))
    assert reason.startswith("not JSON")


async def test_dead_letters_are_recorded_by_project_and_counted_once_when_redelivered(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    before = {
        p: REGISTRY.get_sample_value("maniac_project_records_dead_lettered_total", {"project": p})
        or 0.0
        for p in ("projA", "unknown")
    }
    produced_from_ms = time.time_ns() // 1_000_000
    await produce(
        producer,
        settings.topic,
        [(b"projA/garbage", b"\xff{not json"), event("ok", project="projA")],
    )
    await produce(producer, settings.topic, [(b"", b"[]")])  # no key: project unknown
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: count_is(clickhouse, 1))

        async def recorded() -> bool:
            return len(await _dead_letters(clickhouse)) == 2

        await eventually(recorded)
    first = await _dead_letters(clickhouse)
    assert [(r[0], r[1]) for r in first] == [("", ""), ("projA", "garbage")]
    assert first[0][2] == "event is not a JSON object"
    assert first[1][2].startswith("not JSON")
    assert first[1][3] == settings.topic
    assert first[1][7] == "projA/garbage"
    # the source record's timestamp is part of its identity (a redelivery has the same one)
    assert produced_from_ms <= first[1][8] <= time.time_ns() // 1_000_000
    payload = await clickhouse.rows(
        "SELECT hex(payload) FROM {database}.dead_letters WHERE completion_id = 'garbage'"
    )
    assert payload[0][0] == b"\xff{not json".hex().upper()  # the bytes as they came
    for project in ("projA", "unknown"):
        after = REGISTRY.get_sample_value(
            "maniac_project_records_dead_lettered_total", {"project": project}
        )
        assert after == before[project] + 1

    # the same messages dead-lettered again (a new group re-reads the topic): counted once
    again = settings.model_copy(update={"consumer_group": settings.consumer_group + "-again"})
    async with RunningWorker(again, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 3))
    assert await _dead_letters(clickhouse) == first


async def test_with_worker_processes_rows_and_dead_letters_are_the_same(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    pooled = settings.model_copy(update={"worker_processes": 1})
    messages = [event(f"id-{i}") for i in range(30)] + [(b"p/poison", b"{not json")]
    await produce(producer, settings.topic, messages + messages[:5])  # 5 delivered twice
    async with RunningWorker(pooled, broker, clickhouse) as worker:
        await eventually(lambda: count_is(clickhouse, 30))
        await eventually(lambda: all_committed(worker, 36))
    ids = {r[0] for r in await clickhouse.rows("SELECT completion_id FROM {database}.completions")}
    assert ids == {f"id-{i}" for i in range(30)}


_TRICKY_IDS = ["plain", "it's", 'back\\slash "quoted"', "a,b", "ünïcödé ✓", "new\nline"]


async def _store(ch: ClickHouse, project: str, versions: dict[str, str], sign: int = 1) -> None:
    for completion_id, received_at in versions.items():
        await ch.command(
            "INSERT INTO {database}.completions_in (project, completion_id, received_at, agg_sign) "
            "VALUES ({project:String}, {id:String}, {at:String}, {sign:Int8})",
            {"project": project, "id": completion_id, "at": received_at, "sign": sign},
        )


async def test_stored_versions_are_the_newest_of_each_stored_completion_and_only_those(
    clickhouse: ClickHouse,
) -> None:
    """What FINAL would keep, read without it: the newest received_at of each stored completion
    of the project, whatever other versions and retractions are still in other parts."""
    await _store(clickhouse, "p", dict.fromkeys(_TRICKY_IDS, "2026-11-26 01:00:00.000"))
    await _store(clickhouse, "p", {"plain": "2026-11-26 02:00:00.500"})  # a newer version
    await _store(clickhouse, "p", {"plain": "2026-11-26 01:00:00.000"}, sign=-1)  # its retraction
    await _store(clickhouse, "other", {"only-elsewhere": "2026-11-26 03:00:00.000"})
    new = [f"new-{i}" for i in range(3000)]  # a batch is mostly completions never seen

    found = await stored_versions(clickhouse, "p", [*new, *_TRICKY_IDS, "only-elsewhere"])

    earlier = 1_795_654_800_000  # 2026-11-26 01:00:00 UTC
    assert found == dict.fromkeys(_TRICKY_IDS, earlier) | {"plain": earlier + 3_600_500}
    assert await stored_versions(clickhouse, "p", new) == {}
    [(final,)] = await clickhouse.rows(
        "SELECT toUnixTimestamp64Milli(received_at) FROM {database}.completions FINAL "
        "WHERE project = 'p' AND completion_id = 'plain'"
    )
    assert final == found["plain"]


async def test_the_ids_loaded_from_clickhouse_are_every_stored_completion_s(
    clickhouse: ClickHouse,
) -> None:
    """ClickHouse's hash of what is stored is the one Python computes for a batch, whatever
    the characters of the ids; the rows are read in chunks of whole rows."""
    await _store(clickhouse, "p", dict.fromkeys(_TRICKY_IDS, "2026-11-26 01:00:00.000"))
    await _store(clickhouse, "prójekt", {"x": "2026-11-26 01:00:00.000"})
    await clickhouse.command(
        "INSERT INTO {database}.completions (project, completion_id) "
        "SELECT 'p', concat('gen-', toString(number)) FROM numbers(2500)"
    )
    chunks: list[int] = []
    await clickhouse.read_row_binary(
        STORED_HASHES, 8, lambda chunk: chunks.append(len(chunk)), chunk_rows=1000
    )
    assert sum(chunks) == (2500 + len(_TRICKY_IDS) + 1) * 8
    assert all(size % 8 == 0 for size in chunks)
    assert max(chunks) < 2 * 1000 * 8

    known = await load_known(clickhouse)
    generated = [f"gen-{n}" for n in range(2500)]
    assert known.maybe_stored("p", [*_TRICKY_IDS, *generated]) == [*_TRICKY_IDS, *generated]
    assert known.maybe_stored("prójekt", ["x"]) == ["x"]
    assert known.maybe_stored("p", [f"new-{n}" for n in range(2000)]) == []


async def test_the_ids_loaded_for_some_partitions_are_those_their_keys_go_to(
    clickhouse: ClickHouse,
) -> None:
    """ClickHouse puts a stored completion's key into the partition the producer does: a set
    loaded for some partitions holds exactly their completions, and says any other may be
    stored; one loaded for no partition (a worker standing by) holds nothing."""
    ids = {p: [*_TRICKY_IDS, *(f"gen-{n}" for n in range(300))] for p in ("p", "prójekt")}
    for project, project_ids in ids.items():
        await _store(clickhouse, project, dict.fromkeys(_TRICKY_IDS, "2026-11-26 01:00:00.000"))
        await clickhouse.command(
            "INSERT INTO {database}.completions (project, completion_id) "
            "SELECT {project:String}, concat('gen-', toString(number)) FROM numbers(300)",
            {"project": project},
        )
        assert len(project_ids) == 306
    scope = Scope(3, frozenset({1}))
    known = await load_known(clickhouse, scope)
    held = 0
    for project, project_ids in ids.items():
        partitions = partitions_of([message_key(project, i) for i in project_ids], 3).tolist()
        mine = [i for i, partition in zip(project_ids, partitions, strict=True) if partition == 1]
        assert 60 < len(mine) < 150
        held += len(mine)
        assert known.maybe_stored(project, mine) == mine
        new = [f"new-{n}" for n in range(1000)]
        new_partitions = partitions_of([message_key(project, i) for i in new], 3).tolist()
        assert known.maybe_stored(project, new) == [
            i for i, partition in zip(new, new_partitions, strict=True) if partition != 1
        ]
    assert known.count == held

    standby = await load_known(clickhouse, Scope(3, frozenset()))
    assert standby.count == 0
    assert standby.maybe_stored("p", ["gen-1", "new-1"]) == ["gen-1", "new-1"]


def _version(completion_id: str, received_at_ms: int) -> tuple[bytes, bytes]:
    item = {"input": {"messages": []}, "output": {"choices": [], "model": "m"}}
    value = encode_event(
        kind="register",
        project="p",
        container="c",
        completion_id=completion_id,
        received_at_ms=received_at_ms,
        item=item,
    )
    return message_key("p", completion_id), value


async def _true(value: bool) -> bool:
    return value


def _dedup_ids(answered_by: str) -> float:
    value = REGISTRY.get_sample_value("maniac_worker_dedup_ids_total", {"answered_by": answered_by})
    return value or 0.0


@pytest.mark.parametrize("assign", [True, False], ids=["assigned", "in_the_group"])
async def test_a_new_worker_knows_what_was_stored_before_it_and_asks_only_about_that(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any, assign: bool
) -> None:
    """Newer versions of completions a previous worker stored replace them (a retraction
    each, so every aggregate counts them once); only those are asked of ClickHouse, the new
    ones are known not to be stored. A worker in the group loads the ids it knows when it is
    given partitions (and trusts them once the worker before may no longer write), as
    `maniac serve`'s does at start."""
    first = [_version(f"old-{i}", 1_000) for i in range(30)]
    await produce(producer, settings.topic, first)
    async with RunningWorker(settings, broker, clickhouse, assign=assign) as worker:
        await eventually(lambda: all_committed(worker, 30))

    again = [_version(f"old-{i}", 2_000) for i in range(30)]
    new = [_version(f"new-{i}", 2_000) for i in range(1_000)]
    async with RunningWorker(settings, broker, clickhouse, assign=assign) as worker:
        await eventually(lambda: _true(worker.trusts_known), timeout_s=30)
        by_known, by_clickhouse = _dedup_ids("known_ids"), _dedup_ids("clickhouse")
        await produce(producer, settings.topic, again + new)
        await eventually(lambda: all_committed(worker, 30 + 1_030))  # offsets, from the first
        assert worker.known is not None
        # the 30 loaded, then the 1,000 new ones asked about added (not the 30 again)
        assert worker.known.count == 1_030
        assert REGISTRY.get_sample_value("maniac_worker_known_ids_bytes") == 8 * 1_030

    asked = _dedup_ids("clickhouse") - by_clickhouse
    assert asked == 30  # the stored ones only
    assert _dedup_ids("known_ids") - by_known == 1_030 - asked
    # without a retraction each, the 30 would count twice: 1,060
    assert await counted(clickhouse) == (1_030, 1_030, 1_030)


async def test_completions_delivered_again_are_held_once_in_the_known_ids(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """The set grows with the completions stored, not with the records delivered: the same
    completions delivered again and again (registered again, a replay) take no more memory."""
    messages = [event(f"id-{i}") for i in range(200)]
    async with RunningWorker(settings, broker, clickhouse, assign=True) as worker:
        for delivered in range(1, 6):
            await produce(producer, settings.topic, messages)
            await eventually(lambda: all_committed(worker, 200 * delivered))  # noqa: B023
        assert worker.known is not None
        assert worker.known.count == 200
        assert REGISTRY.get_sample_value("maniac_worker_known_ids_bytes") == 8 * 200
    assert await counted(clickhouse) == (200, 200, 200)


async def test_known_ids_that_failed_to_load_are_loaded_again_by_a_later_batch(
    settings: ServeSettings,
    broker: Broker,
    clickhouse: ClickHouse,
    producer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "KNOWN_IDS_RETRY_S", 0.5)
    # the load at start fails for real: the table is not there
    async with (
        completions_away(clickhouse) as back,
        RunningWorker(settings, broker, clickhouse, assign=True) as worker,
    ):
        await asyncio.sleep(1.0)
        assert worker.known is None
        await back()
        by_known = _dedup_ids("known_ids")
        await produce(producer, settings.topic, [_version(f"n-{i}", 1_000) for i in range(50)])
        await eventually(lambda: all_committed(worker, 50))
        assert worker.known is not None
        assert _dedup_ids("known_ids") - by_known == 50


async def test_workers_sharing_a_topic_each_know_their_partitions_completions_and_no_more(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """Two workers in the group each load the stored completions of the partitions they are
    given, which together are every one; newer versions of those are asked of ClickHouse and
    replace them, new completions are not asked. A record the producer put into another
    partition than its key's is asked too: its worker does not hold its completion."""
    first = [_version(f"old-{i}", 1_000) for i in range(200)]
    await produce(producer, settings.topic, first)
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 200), timeout_s=30)

    async with (
        RunningWorker(settings, broker, clickhouse) as a,
        RunningWorker(settings, broker, clickhouse) as b,
    ):

        async def shared_out() -> bool:
            scoped = all(w.known is not None and w.known.scope is not None for w in (a, b))
            return scoped and a.trusts_known and b.trusts_known

        await eventually(shared_out, timeout_s=40)
        every = partitions_of([key for key, _ in first], 4).tolist()
        held = []
        for w in (a, b):
            known = w.known
            assert known is not None
            assert known.scope is not None
            assert known.scope.partitions == 4
            assert known.count == sum(p in known.scope.assigned for p in every)
            held.append(known.scope.assigned)
        assert held[0] | held[1] == {0, 1, 2, 3}
        assert not held[0] & held[1]

        by_known, by_clickhouse = _dedup_ids("known_ids"), _dedup_ids("clickhouse")
        again = [_version(f"old-{i}", 2_000) for i in range(150)]
        new = [_version(f"new-{i}", 2_000) for i in range(300)]
        await produce(producer, settings.topic, again + new)
        misplaced = [_version(f"old-{i}", 2_000) for i in range(150, 160)]
        owners = partitions_of([key for key, _ in misplaced], 4).tolist()
        for (key, value), own in zip(misplaced, owners, strict=True):
            await producer.send_and_wait(
                settings.topic, value=value, key=key, partition=(own + 1) % 4
            )

        await eventually(lambda: all_committed_by([a, b], 200 + 150 + 300 + 10), timeout_s=30)
        # a `maniac serve` in a group (an external Kafka): its gateway's acknowledgements in
        # the other workers' partitions are theirs to store, not a backlog of its own
        acked = {p: o - 1 for w in (a, b) for p, o in w.committed_offsets().items()}
        assert set(acked) == {0, 1, 2, 3}
        assert (a.pending(acked), b.pending(acked)) == (0, 0)
        assert await a.drain(acked, 1.0)
        assert await b.drain(acked, 1.0)

    assert _dedup_ids("clickhouse") - by_clickhouse == 150 + 10
    assert _dedup_ids("known_ids") - by_known == 300
    # without a retraction each, the 160 would count twice
    assert await counted(clickhouse) == (500, 500, 500)


async def test_a_worker_stuck_on_clickhouse_hands_its_partitions_over_without_writing_later(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """While ClickHouse is down, a rebalance does not wait for it: the worker gives up the
    batch it could not store (it commits nothing of it) and lets its partitions go at once,
    so it can never write that batch after another worker took them. Once ClickHouse is back,
    every completion is stored and counted once."""
    async with completions_away(clickhouse) as back:
        await produce(producer, settings.topic, [event(f"id-{i}") for i in range(40)])
        before, revoked_before = _retries(), _given_up("revoked")
        async with RunningWorker(settings, broker, clickhouse) as a:

            async def stuck() -> bool:
                return _retries() > before

            await eventually(stuck, timeout_s=20)
            async with RunningWorker(settings, broker, clickhouse) as b:

                async def both_have_partitions() -> bool:
                    return bool(a.partitions) and bool(b.partitions)

                await eventually(both_have_partitions, timeout_s=15)
                assert a.committed_offsets() == {}
                assert _given_up("revoked") > revoked_before
                await back()
                await eventually(lambda: all_committed_by([a, b], 40), timeout_s=30)
    assert await counted(clickhouse) == (40, 40, 40)


def _retries() -> float:
    return sum(
        REGISTRY.get_sample_value("maniac_worker_retries_total", {"what": what}) or 0.0
        for what in ("dedup_lookup", "insert")
    )


def _given_up(reason: str) -> float:
    value = REGISTRY.get_sample_value("maniac_worker_batches_given_up_total", {"reason": reason})
    return value or 0.0


async def test_a_batch_not_stored_in_time_is_given_up_and_fetched_again(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """A worker in a group that cannot store a batch stops fetching once the next batch is
    ready (one batch in flight at a time); past ``give_up_after_s`` without a fetch, it gives
    the batch up, uncommitted, and fetches everything again from the committed offsets (so
    Kafka keeps it in the group). Once ClickHouse is back, everything is stored once."""
    settings = settings.model_copy(update={"give_up_after_s": 1.0})
    given_up, retries = _given_up("not_stored_in_time"), _retries()
    async with completions_away(clickhouse) as back:
        await produce(producer, settings.topic, [event(f"id-{i}") for i in range(30)])
        async with RunningWorker(settings, broker, clickhouse) as worker:

            async def retrying() -> bool:
                return _retries() > retries

            await eventually(retrying, timeout_s=20)
            # a second batch: the worker waits for the first before it fetches again
            await produce(producer, settings.topic, [event(f"id-{i}") for i in range(30, 40)])

            async def gave_up() -> bool:
                return _given_up("not_stored_in_time") > given_up

            await eventually(gave_up, timeout_s=20)
            retries = _retries()
            await eventually(retrying, timeout_s=20)  # fetched again, and asking again
            assert worker.committed_offsets() == {}
            await back()
            await eventually(lambda: all_committed(worker, 40), timeout_s=30)
    assert await counted(clickhouse) == (40, 40, 40)


async def test_a_batch_spanning_more_than_a_hundred_months_is_stored_once(
    clickhouse: ClickHouse,
) -> None:
    # a history import: the aggregate tables are partitioned by month, and ClickHouse refuses
    # by default an insert that writes more than 100 partitions at once
    month = 31 * 86_400
    values = [event(f"old-{i}", created=1_000_000_000 + i * month)[1] for i in range(150)]
    await asyncio.wait_for(store(clickhouse, values), timeout=60)
    assert await counted(clickhouse) == (150, 150, 150)


async def test_an_insert_whose_answer_was_lost_is_retried_and_counted_once(
    clickhouse: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the insert reaches every table, then the connection drops before the answer (a timeout
    # or a reset on a ClickHouse server): the worker cannot know, and inserts again
    insert = clickhouse.insert_json_compact
    answers_lost = 1

    async def answer_lost(*args: Any, **kwargs: Any) -> None:
        nonlocal answers_lost
        await insert(*args, **kwargs)
        if answers_lost:
            answers_lost -= 1
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(clickhouse, "insert_json_compact", answer_lost)
    await asyncio.wait_for(store(clickhouse, [event(f"c{i}")[1] for i in range(3)]), 30)
    assert answers_lost == 0
    assert await counted(clickhouse) == (3, 3, 3)
    [(daily,)] = await clickhouse.rows("SELECT sum(requests) FROM {database}.usage_daily")
    assert daily == 3


async def test_an_insert_that_failed_halfway_through_the_views_is_retried_and_counted_once(
    clickhouse: ClickHouse,
) -> None:
    # the last view's table refuses every block for a while: the tables before it are written,
    # then the insert fails, and is retried until the table takes blocks again
    await clickhouse.command(
        "ALTER TABLE {database}.usage_daily ADD CONSTRAINT refusing CHECK requests < 0"
    )
    storing = asyncio.create_task(store(clickhouse, [event(f"c{i}")[1] for i in range(3)]))
    try:
        await eventually(lambda: count_is(clickhouse, 3))  # written before the failure
        await asyncio.sleep(0.5)  # and a few retries
    finally:
        await clickhouse.command("ALTER TABLE {database}.usage_daily DROP CONSTRAINT refusing")
    await asyncio.wait_for(storing, 30)
    assert await counted(clickhouse) == (3, 3, 3)
    [(daily,)] = await clickhouse.rows("SELECT sum(requests) FROM {database}.usage_daily")
    assert daily == 3


class _BrokerGone:
    """The producer of a worker whose broker died: nothing reaches the dead-letter topic."""

    async def send(self, *args: Any, **kwargs: Any) -> None:
        raise KafkaConnectionError("broker gone")


async def test_a_worker_stopping_with_its_broker_gone_stores_everything_it_fetched(
    clickhouse: ClickHouse,
) -> None:
    # `maniac serve` detaches its worker when its memory broker dies: what it fetched exists
    # nowhere else. A dead letter of the batch in flight cannot be sent, and the next batch
    # is stored all the same; nothing is committed past the failure.
    settings = WorkerSettings(batch_max_rows=3, insert_retry_initial_s=0.05)
    commits = _Commits()
    worker = Worker(settings, commits, _BrokerGone(), clickhouse)
    values = [event("a1")[1], b"\xff{not json", event("a2")[1], event("b1")[1], event("b2")[1]]
    for offset, value in enumerate(values):  # the first three make a batch, written at once
        await worker.pipeline.first.submit(Message(Partition("t", 0), offset, b"p/x", value))
    await asyncio.sleep(0.2)  # its dead letter is being retried
    worker.detach()
    with pytest.raises(KafkaConnectionError):
        await worker.flush()
    stored = await clickhouse.rows("SELECT completion_id FROM {database}.completions FINAL")
    assert sorted(r[0] for r in stored) == ["a1", "a2", "b1", "b2"]
    assert len(await _dead_letters(clickhouse)) == 1  # kept in ClickHouse before the topic
    assert worker.committed_offsets() == {}


async def test_a_worker_detached_while_it_starts_on_a_broker_that_does_not_answer_stops(
    settings: ServeSettings, clickhouse: ClickHouse
) -> None:
    """A worker a revival started asks its broker for its partitions and commits where it
    starts: the broker dies first (frozen here: it never answers), and the next revival
    detaches that worker. It stops then, as it would fetching, instead of waiting on the
    broker: aiokafka's commit waits for it to be back, which the revival does only after
    the worker stopped (it waited 10 s for it, holding publishing)."""
    own = EmbeddedBroker()
    own.start()
    consumer = create_worker_consumer(own.bootstrap, settings)
    try:
        await ensure_topics(own.bootstrap, [settings.topic], partitions=1)
        await consumer.start()
        worker = Worker(settings, consumer, _BrokerGone(), clickhouse, assign=True, start_at={0: 5})
        assert own.pid is not None
        os.kill(own.pid, signal.SIGSTOP)
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # it waits on the broker
        worker.detach()
        await asyncio.wait_for(running, 30)  # it waited on for as long as the broker was frozen
        assert worker.committed_offsets() == {0: 5}  # where the next worker resumes
    finally:
        own.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.stop(), 10)


async def _group_committed(bootstrap: str, settings: ServeSettings, partitions: list[int]) -> int:
    """The offsets the broker holds for the workers' group, added over these partitions."""
    consumer = create_consumer(bootstrap, group_id=settings.consumer_group)
    await consumer.start()
    try:
        found = [await consumer.committed(TopicPartition(settings.topic, p)) for p in partitions]
    finally:
        await consumer.stop()
    return sum(offset or 0 for offset in found)


async def test_records_fetched_before_a_rebalance_are_not_written_after_it(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """A fetch can return just before the partitions are revoked and reach the worker only
    after it let them go. Some of its records are another worker's by then, which stores them
    too: had the first one written them as well (its insert slow, here), every aggregate would
    count them twice. The worker drops such a fetch; the partitions it keeps it fetches again
    from the committed offsets."""
    first, second = ([event(f"{n}-{i}") for i in range(40)] for n in ("first", "second"))
    await produce(producer, settings.topic, first)
    ends = [0, 0, 0, 0]
    for partition in partitions_of([key for key, _ in first + second], 4).tolist():
        ends[partition] += 1
    slow = clickhouse.with_database(clickhouse.database)  # the first worker's, slow to insert
    insert, inserting = slow.insert_json_compact, asyncio.Event()
    inserting.set()

    async def slow_insert(*args: Any, **kwargs: Any) -> None:
        await inserting.wait()
        await insert(*args, **kwargs)

    slow.insert_json_compact = slow_insert  # type: ignore[method-assign]
    running = RunningWorker(settings, broker, slow)
    async with running as a:
        await eventually(lambda: all_committed(a, 40), timeout_s=30)
        assert a.partitions == [0, 1, 2, 3]
        consumer, fetch, held = running.consumer, a._fetch, asyncio.Event()

        def reloaded() -> bool:
            known = a.known
            mine = frozenset(a.partitions)
            return known is not None and known.scope is not None and known.scope.assigned == mine

        async def fetched_then_revoked() -> Any:
            fetched = await fetch()
            if len(fetched[0]) == 4 and not held.is_set():
                held.set()  # taken by the worker once another one has some of the partitions
                await eventually(lambda: _true(0 < len(a.partitions) < 4 and reloaded()), 30)
            return fetched

        every = consumer.assignment()
        consumer.pause(*every)  # so that one fetch returns the records of every partition
        await produce(producer, settings.topic, second)
        inserting.clear()
        a._fetch = fetched_then_revoked  # type: ignore[method-assign]
        consumer.resume(*every)
        await held.wait()
        async with RunningWorker(settings, broker, clickhouse) as b:
            await eventually(lambda: _true(bool(b.partitions) and 0 < len(a.partitions) < 4), 30)

            async def stored_by_b() -> bool:
                theirs = b.partitions
                done = await _group_committed(broker.bootstrap, settings, theirs)
                return done == sum(ends[p] for p in theirs)

            await eventually(stored_by_b, timeout_s=30)
            inserting.set()

            async def all_in_the_group() -> bool:
                return await _group_committed(broker.bootstrap, settings, [0, 1, 2, 3]) == 80

            await eventually(all_in_the_group, timeout_s=30)
            await asyncio.sleep(0.5)  # any insert still under way
    assert await counted(clickhouse) == (80, 80, 80)


@pytest.mark.parametrize(
    "more", [0, 5], ids=["idle_with_a_batch_in_flight", "held_behind_the_batch_in_flight"]
)
async def test_a_worker_stopped_while_clickhouse_fails_stops_cleanly_and_loses_nothing(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any, more: int
) -> None:
    """`maniac worker` on SIGTERM with ClickHouse away: it stops, says so once (no traceback),
    commits nothing, and the next worker reads the records again and stores them."""
    async with completions_away(clickhouse) as back:
        await produce(producer, settings.topic, [event(f"id-{i}") for i in range(5)])
        retries = _store_retries()
        running = RunningWorker(settings, broker, clickhouse)
        worker = await running.__aenter__()

        async def retrying() -> bool:
            return _store_retries() >= retries + 2

        await eventually(retrying)
        if more:  # fetched while the first batch is retried: the runner waits behind it
            await produce(producer, settings.topic, [event(f"id-{i}") for i in range(5, 10)])
            await asyncio.sleep(0.5)
        with structlog.testing.capture_logs() as logs:
            await running.__aexit__()  # what SIGTERM does: stop
        assert worker.committed_offsets() == {}
        failures = [e for e in logs if e["log_level"] in ("warning", "error")]
        assert [e["event"] for e in failures] == ["worker_stopped_unstored"], logs
        assert not [e for e in logs if e.get("exc_info")]
        await back()
    async with RunningWorker(settings, broker, clickhouse) as again:
        await eventually(lambda: count_is(clickhouse, 5 + more))
        await eventually(lambda: all_committed(again, 5 + more))
