"""Inserts a killed process began are seen through by the next worker on the embedded engine,
and counted once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from services.common.clickhouse import ClickHouse
from services.common.settings import ServeSettings
from services.worker.journal import InsertJournal
from tests.conftest import Broker, eventually
from tests.support.worker import (
    RunningWorker,
    all_committed,
    count_is,
    counted,
    event,
    produce,
    store,
)


def _journal(clickhouse: ClickHouse) -> InsertJournal:
    journal = InsertJournal.of(clickhouse)
    if journal is None:
        pytest.skip("only the embedded ClickHouse dies with the worker's process")
    return journal


async def _daily(clickhouse: ClickHouse) -> int:
    [(daily,)] = await clickhouse.rows("SELECT sum(requests) FROM {database}.usage_daily")
    return int(daily)


async def _killed_before(clickhouse: ClickHouse, table: str, refusing: str) -> None:
    """Store 3 completions as a worker does, and kill it once ``completions`` has them, before
    ``table`` does (it refuses blocks until then through the check ``refusing``, so the moment
    is sure)."""
    await clickhouse.command(
        f"ALTER TABLE {{database}}.{table} ADD CONSTRAINT refusing CHECK {refusing}"
    )
    storing = asyncio.create_task(store(clickhouse, [event(f"c{i}")[1] for i in range(3)]))
    try:
        await eventually(lambda: count_is(clickhouse, 3))
        await asyncio.sleep(0.2)
    finally:
        storing.cancel()  # killed: nothing after this point runs in that worker
        with contextlib.suppress(asyncio.CancelledError):
            await storing
        await clickhouse.command(f"ALTER TABLE {{database}}.{table} DROP CONSTRAINT refusing")


async def test_an_insert_cut_short_by_the_process_dying_is_finished_by_the_next_worker(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse
) -> None:
    journal = _journal(clickhouse)
    # the insert reaches completions, the list and usage_hourly; the process dies before
    # usage_daily has the batch
    await _killed_before(clickhouse, "usage_daily", "requests < 0")
    assert await counted(clickhouse) == (3, 3, 3)
    assert await _daily(clickhouse) == 0  # the aggregates disagree with completions

    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _daily_is(clickhouse, 3))
    assert await counted(clickhouse) == (3, 3, 3)
    assert journal.unfinished() == []


async def test_an_insert_that_landed_before_the_process_died_is_not_counted_twice(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _journal(clickhouse)
    with monkeypatch.context() as patched:  # killed after the insert, before its entry went
        patched.setattr(InsertJournal, "end", staticmethod(lambda entry: None))
        await store(clickhouse, [event(f"c{i}")[1] for i in range(3)])
    assert len(journal.unfinished()) == 1

    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _empty(journal))
    assert await counted(clickhouse) == (3, 3, 3)
    assert await _daily(clickhouse) == 3


async def _daily_is(clickhouse: ClickHouse, n: int) -> bool:
    return await _daily(clickhouse) == n


async def _empty(journal: InsertJournal) -> bool:
    return journal.unfinished() == []


async def test_an_insert_that_failed_as_the_worker_stopped_is_finished_by_the_next_worker(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    """A batch whose insert fails while the worker stops, after reaching some tables, keeps
    its entry, though the records fetched after it are salvaged in an insert of their own: the
    next worker finds the batch stored in ``completions`` and drops its records, so only its
    entry can bring the other tables into line."""
    journal = _journal(clickhouse)
    held = settings.model_copy(update={"batch_max_rows": 3, "batch_max_ms": 60_000})
    await clickhouse.command(
        "ALTER TABLE {database}.usage_daily ADD CONSTRAINT refusing CHECK requests < 0"
    )
    try:
        running = RunningWorker(held, broker, clickhouse, assign=True)
        worker = await running.__aenter__()
        try:
            await produce(producer, settings.topic, [event(f"a{i}") for i in range(3)])
            await eventually(lambda: count_is(clickhouse, 3))  # retried: usage_daily refuses
            await produce(producer, settings.topic, [event(f"b{i}") for i in range(2)])

            async def next_batch_held() -> bool:
                return len(worker.pipeline.first._batch) == 2

            await eventually(next_batch_held)
        finally:
            await running.__aexit__()  # the batch in flight fails, the one held is salvaged
    finally:
        await clickhouse.command("ALTER TABLE {database}.usage_daily DROP CONSTRAINT refusing")
    assert await _daily(clickhouse) == 0
    assert len(journal.unfinished()) == 2

    async with RunningWorker(settings, broker, clickhouse, assign=True) as again:
        await eventually(lambda: all_committed(again, 5))
    assert await counted(clickhouse) == (5, 5, 5)
    assert await _daily(clickhouse) == 5
    assert journal.unfinished() == []


async def test_an_insert_whose_part_in_completions_was_lost_with_its_token_kept_is_stored_once(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse
) -> None:
    """A process killed as ``completions`` took the insert's part can leave its deduplication
    token noted and the part gone: the insert again is dropped there but counted by the other
    tables. (Seen after a kill -9 of ``maniac serve``: completions of the list and the usage
    missing from ``completions``, then counted twice once their records came again.)"""
    journal = _journal(clickhouse)
    # the insert reaches completions; the process dies before the list's index has it
    await _killed_before(clickhouse, "completion_listing", "sign < -5")
    # ... and its part in completions never made it, though its token did
    await clickhouse.command("DELETE FROM {database}.completions WHERE 1")
    assert (await counted(clickhouse))[2] == 0

    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _empty(journal))
        assert await counted(clickhouse) == (3, 3, 3)
        assert await _daily(clickhouse) == 3
        [(listed, ids)] = await clickhouse.rows(
            "SELECT sum(sign), uniqExact(completion_id) FROM {database}.completion_listing"
        )
        assert (listed, ids) == (3, 3)
        [(kept,)] = await clickhouse.rows(
            "SELECT countIf(agg_sign = 1) FROM {database}.completions FINAL"
        )
        assert kept == 3  # the rows, not their retractions, are the versions kept
        # the same records delivered again are found stored, not counted a second time
        await store(clickhouse, [event(f"c{i}")[1] for i in range(3)])
    assert await counted(clickhouse) == (3, 3, 3)
    assert await _daily(clickhouse) == 3
