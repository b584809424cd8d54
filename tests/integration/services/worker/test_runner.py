"""The worker against the real broker and the real ClickHouse engine."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.clickhouse import ClickHouse
from services.common.kafka import create_consumer
from services.common.settings import ServeSettings
from tests.conftest import Broker, eventually
from tests.support.worker import RunningWorker, all_committed, count_is, event, produce


async def test_valid_messages_are_stored_once_and_offsets_committed(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    messages = [event(f"id-{i}") for i in range(50)]
    await produce(producer, settings.topic, messages + messages[:10])  # 10 delivered twice
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: count_is(clickhouse, 50))
        await eventually(lambda: all_committed(worker, 60))
    raw = await clickhouse.rows("SELECT count() FROM {database}.completions")
    assert raw[0][0] >= 50  # duplicates may sit in parts until merged; FINAL hides them


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


async def test_insert_failures_are_retried_without_commit_then_resume(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    # Make ClickHouse refuse inserts for a while by renaming the table away, for real.
    await clickhouse.command("RENAME TABLE {database}.completions TO {database}.completions_away")
    await produce(producer, settings.topic, [event(f"id-{i}") for i in range(5)])
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await asyncio.sleep(1.5)
        assert worker.committed_offsets() == {}
        await clickhouse.command(
            "RENAME TABLE {database}.completions_away TO {database}.completions"
        )
        await eventually(lambda: count_is(clickhouse, 5))
        await eventually(lambda: all_committed(worker, 5))


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
