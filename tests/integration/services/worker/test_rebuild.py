"""The derived tables, rebuilt from completions after one lost rows, hold what they held."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.clickhouse import ClickHouse
from services.common.settings import ServeSettings
from services.worker.journal import InsertJournal
from services.worker.rebuild import Count, check, rebuild
from tests.conftest import Broker, eventually
from tests.support.worker import RunningWorker, all_committed, counted, event, produce, store

# What each derived table says, in a form that does not depend on how its parts merged.
STATES = {
    "completion_listing": (
        "SELECT project, created, completion_id, model, container, sum(sign) AS s "
        "FROM {database}.completion_listing GROUP BY ALL HAVING s != 0 ORDER BY ALL"
    ),
    "completion_counts": (
        "SELECT project, model, container, sum(completions) AS n "
        "FROM {database}.completion_counts GROUP BY ALL HAVING n != 0 ORDER BY ALL"
    ),
    **{
        table: (
            "SELECT project, bucket, container, model, provider, sum(requests) AS n, "
            "sum(errors), sum(unpriced), sum(prompt_tokens), sum(completion_tokens), "
            "sum(cached_tokens), sum(reasoning_tokens), sum(total_tokens), sum(spend) "
            f"FROM {{database}}.{table} GROUP BY ALL HAVING n != 0 ORDER BY ALL"
        )
        for table in ("usage_hourly", "usage_daily")
    },
}


async def _states(ch: ClickHouse) -> dict[str, list[list[Any]]]:
    return {table: [list(r) for r in await ch.rows(sql)] for table, sql in STATES.items()}


def _messages(version: int, changed: bool = False) -> list[tuple[bytes, bytes]]:
    messages = []
    for i in range(40):
        tokens = {"prompt_tokens": 10 + i, "completion_tokens": i, "total_tokens": 10 + 2 * i}
        extra: dict[str, Any] = {
            "model": ["openai/gpt-4o", "unknown/model"][i % 2],
            "usage": {**tokens, "prompt_tokens": 1000 + i} if changed else tokens,
            "created": 1_750_000_000 + i * 3000,
        }
        key, value = event(f"id-{i}", **extra)
        value = value.replace(b'"received_at_ms":1700000000000', b'"received_at_ms":%d' % version)
        messages.append((key, value))
    return messages


async def test_derived_tables_that_lost_rows_are_found_and_rebuilt(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    changed = _messages(version=1_700_000_001_000, changed=True)[:15]  # registered again
    await produce(producer, settings.topic, _messages(version=1_700_000_000_000) + changed)
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 55))
    before = await _states(clickhouse)
    assert all(before.values())
    assert all(count.ok for count in await check(clickhouse))

    # rows lost, as when ClickHouse detaches a broken part of each
    for table in ("completion_listing", "completion_counts", "usage_hourly", "usage_daily"):
        await clickhouse.command(
            f"DELETE FROM {{database}}.{table} WHERE model = 'openai/gpt-4o'",
        )
    assert [count.table for count in await check(clickhouse) if not count.ok] == [
        "completion_listing",
        "completion_counts",
        "usage_hourly",
        "usage_daily",
    ]

    counts = await rebuild(clickhouse)
    assert counts == [
        Count(table, 40, 40)
        for table in ("completion_listing", "completion_counts", "usage_hourly", "usage_daily")
    ]
    assert await _states(clickhouse) == before


async def test_groups_that_differ_are_found_where_the_totals_agree(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    await produce(producer, settings.topic, _messages(version=1_700_000_000_000))
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 40))
    assert all(count.ok for count in await check(clickhouse))

    # each table's completions still add up to 40, but what it holds moved or changed
    await clickhouse.command(
        "INSERT INTO {database}.completion_listing VALUES "
        "('ghost', '2025-06-15 00:00:00', 'in', 'm', 'c', 1), "
        "('ghost', '2025-06-15 00:00:00', 'out', 'm', 'c', -1)"
    )
    await clickhouse.command(
        "INSERT INTO {database}.completion_counts VALUES "
        "('ghost', 'in', 'c', 1, 1), ('ghost', 'out', 'c', -1, 1)"
    )
    for table in ("usage_hourly", "usage_daily"):  # tokens no completion of this hour used
        await clickhouse.command(
            f"INSERT INTO {{database}}.{table} (project, bucket, container, model, provider, "
            "requests, total_tokens) VALUES ('ghost', '2025-06-15 00:00:00', 'c', 'm', 'p', 0, 7)"
        )
    assert await check(clickhouse) == [
        Count("completion_listing", 40, 40, differing=2),
        Count("completion_counts", 40, 40, differing=2),
        Count("usage_hourly", 40, 40, differing=1),
        Count("usage_daily", 40, 40, differing=1),
    ]
    assert all(count.ok for count in await rebuild(clickhouse))


async def test_an_insert_left_unfinished_is_counted_once_after_a_rebuild(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on the embedded ClickHouse killed once its insert went through, before its
    entry was ended, and a rebuild before the next start (serve stopped, as it must be):
    emptying the tables forgot the insert's deduplication token, so the next worker, finishing
    the insert, would count it a second time in every rebuilt table."""
    journal = InsertJournal.of(clickhouse)
    if journal is None:
        pytest.skip("only the embedded ClickHouse keeps unfinished inserts")
    with monkeypatch.context() as patched:  # killed after the insert, before its entry went
        patched.setattr(InsertJournal, "end", staticmethod(lambda entry: None))
        await store(clickhouse, [event(f"c{i}")[1] for i in range(3)])
    assert len(journal.unfinished()) == 1

    assert all(count.ok for count in await rebuild(clickhouse))
    async with RunningWorker(settings, broker, clickhouse):
        await eventually(lambda: _finished(journal))
    assert await counted(clickhouse) == (3, 3, 3)
    assert all(count.ok for count in await check(clickhouse))


async def _finished(journal: InsertJournal) -> bool:
    return journal.unfinished() == []
