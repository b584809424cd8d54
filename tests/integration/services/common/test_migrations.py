from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

import pytest

from schemas import COMPLETIONS_INSERT_COLUMNS, COMPLETIONS_INSERT_TABLE
from schemas.events import encode_event
from services.common.clickhouse import ClickHouse
from services.common.migrations import (
    SchemaNotReady,
    load_migrations,
    migrate,
    missing_migrations,
    wait_for_schema,
)
from services.worker.pipeline import process
from services.worker.pipeline.types import Row
from services.worker.runner import insert_rows, retractions
from tests.conftest import unique
from tests.support.migrations import apply_migrations, database_before


async def test_fixture_database_is_fully_migrated(clickhouse: ClickHouse) -> None:
    applied = {
        int(r[0]) for r in await clickhouse.rows("SELECT version FROM {database}.schema_migrations")
    }
    assert applied == {m.version for m in load_migrations()}
    tables = {r[0] for r in await clickhouse.rows("SHOW TABLES FROM {database}")}
    assert {"completions", "api_keys", "schema_migrations"} <= tables


async def test_migrate_again_applies_nothing(clickhouse: ClickHouse) -> None:
    assert await migrate(clickhouse) == []
    rows = await clickhouse.rows("SELECT count() FROM {database}.schema_migrations FINAL")
    assert rows[0][0] == len(load_migrations())


async def test_the_worker_s_row_has_every_column_of_the_completions_tables(
    clickhouse: ClickHouse,
) -> None:
    """A column a migration adds must join ``COMPLETIONS_INSERT_COLUMNS``: a retraction is a
    copy of those columns, and a view summing one it lacks would count it wrong."""
    for table in ("completions", COMPLETIONS_INSERT_TABLE):
        columns = await clickhouse.rows(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            {"db": clickhouse.database, "t": table},
        )
        assert {c for (c,) in columns} == {*COMPLETIONS_INSERT_COLUMNS, "inserted_at"}, table
    assert len(set(COMPLETIONS_INSERT_COLUMNS)) == len(COMPLETIONS_INSERT_COLUMNS)


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def test_a_batch_of_completions_is_stored_in_compact_parts(clickhouse: ClickHouse) -> None:
    """0009: a worker-sized batch (over the 10 MiB where ClickHouse would write Wide parts)."""
    text = "lorem ipsum dolor sit amet " * 110
    rows = [
        encode_event(
            kind="register",
            project="p-compact",
            container="c",
            completion_id=f"cmpl-{n}",
            received_at_ms=1_767_225_600_000 + n,
            item={
                "input": {"messages": [{"role": "user", "content": f"{n} {text}"}]},
                "output": {
                    "model": "openai/gpt-4o",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                },
            },
        )
        for n in range(4_000)
    ]
    lines = [row.json for row in map(process, rows) if isinstance(row, Row)]
    assert len(lines) == 4_000
    await insert_rows(clickhouse, b"\n".join(lines))

    parts = await clickhouse.rows(
        "SELECT table, part_type, sum(data_uncompressed_bytes) FROM system.parts "
        "WHERE database = {db:String} AND active "
        "AND table IN ('completions', 'completion_responses') GROUP BY table, part_type",
        {"db": clickhouse.database},
    )
    assert {(table, kind) for table, kind, _ in parts} == {
        ("completions", "Compact"),
        ("completion_responses", "Compact"),
    }
    completions_bytes = next(size for table, _, size in parts if table == "completions")
    assert completions_bytes > 10 * 1024 * 1024  # Wide without the migration


async def test_tables_of_whole_bodies_merge_about_twelve_parts_at_once(
    clickhouse: ClickHouse,
) -> None:
    """0010: the engine holds the setting for the two tables (new parts merge by it)."""
    rows = await clickhouse.rows(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
        "AND name IN ('completions', 'completion_responses', 'completion_listing')",
        {"db": clickhouse.database},
    )
    wider = {name for name, ddl in rows if "merge_selector_base = 12" in ddl}
    assert wider == {"completions", "completion_responses"}


def _event(completion_id: str, *, received_at_ms: int = 1_767_225_600_000) -> bytes:
    return encode_event(
        kind="register",
        project="p-once",
        container="c",
        completion_id=completion_id,
        received_at_ms=received_at_ms,
        item={
            "input": {"messages": [{"role": "user", "content": f"question {completion_id}"}]},
            "output": {"choices": [{"index": 0, "message": {"content": completion_id}}]},
        },
    )


def _row(value: bytes) -> bytes:
    row = process(value)
    assert isinstance(row, Row)
    return row.json


async def _stored(clickhouse: ClickHouse, table: str) -> dict[str, list[tuple[int, str]]]:
    """Each completion's rows in ``table``: (received_at in ms, response text)."""
    rows = await clickhouse.rows(
        "SELECT completion_id, toUnixTimestamp64Milli(received_at), response "
        f"FROM {{database}}.{table} WHERE project = 'p-once' "
        "ORDER BY completion_id, received_at"
    )
    stored: dict[str, list[tuple[int, str]]] = {}
    for completion_id, received, response in rows:
        stored.setdefault(completion_id, []).append((int(received), str(response)))
    return stored


async def test_a_response_is_stored_once_and_an_earlier_writer_still_stores_its_own(
    clickhouse: ClickHouse,
) -> None:
    """0011: what is written to completions_in keeps its response only in
    completion_responses; a row still written to completions itself is copied there too."""
    new, old = _row(_event("new")), _row(_event("old"))
    await insert_rows(clickhouse, new)
    await insert_rows(clickhouse, old, table="completions")  # a worker of an earlier release
    # a newer version with the retraction of the stored one, as the worker writes it
    [retraction] = await retractions(clickhouse, "p-once", ["new"])
    newer = _row(_event("new", received_at_ms=1_767_225_600_500))
    await insert_rows(clickhouse, retraction + b"\n" + newer)

    completions = await _stored(clickhouse, "completions")
    responses = await _stored(clickhouse, "completion_responses")
    # (a version and its retraction may already be merged away: a ReplacingMergeTree)
    assert {response for _, response in completions["new"]} == {""}
    assert completions["new"][-1][0] == 1_767_225_600_500
    assert [r for _, r in completions["old"]] == [old_response := responses["old"][0][1]]
    assert '"id":"old"' in old_response
    assert [t for t, _ in responses["new"]] == [1_767_225_600_000, 1_767_225_600_500]
    assert all('"id":"new"' in r for _, r in responses["new"])
    assert len(responses["old"]) == 1


async def test_wait_for_schema_returns_at_once_on_a_migrated_database(
    clickhouse: ClickHouse,
) -> None:
    assert await missing_migrations(clickhouse) == []
    await asyncio.wait_for(wait_for_schema(clickhouse, timeout_s=0), timeout=5)


async def test_wait_for_schema_waits_until_a_migrator_has_applied_every_migration(
    clickhouse_engine: ClickHouse,
) -> None:
    db = clickhouse_engine.with_database(unique("t"))
    try:
        waiting = asyncio.create_task(wait_for_schema(db, timeout_s=60, poll_s=0.05))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert [m.version for m in await missing_migrations(db)] == [
            m.version for m in load_migrations()
        ]
        await migrate(db)
        await asyncio.wait_for(waiting, timeout=10)
    finally:
        await db.command("DROP DATABASE IF EXISTS {database}")


async def test_wait_for_schema_names_the_missing_migrations_when_none_come(
    clickhouse_engine: ClickHouse,
) -> None:
    db = clickhouse_engine.with_database(unique("t"))
    try:
        await migrate(db)
        last = load_migrations()[-1]
        await db.command(
            "ALTER TABLE {database}.schema_migrations DELETE WHERE version = {v:UInt32} "
            "SETTINGS mutations_sync = 1",
            {"v": last.version},
        )
        with pytest.raises(SchemaNotReady) as raised:
            await wait_for_schema(db, timeout_s=0.3, poll_s=0.05)
        assert f"{last.version:04d}_{last.name}" in str(raised.value)
        assert "maniac migrate" in str(raised.value)
        assert [m.version for m in await missing_migrations(db)] == [last.version]
    finally:
        await db.command("DROP DATABASE IF EXISTS {database}")


def _usage_event(n: int, *, version: int = 0) -> bytes:
    """Completion ``n`` of three days, five hours each, two models; two in five timed."""
    output: dict[str, object] = {
        "model": ["openai/gpt-4o", "openai/gpt-4o-mini"][n % 2],
        "created": 1_767_225_600 + (n % 3) * 86_400 + (n % 5) * 3_600 + n,
        "usage": {
            "prompt_tokens": 10 + n + version,
            "completion_tokens": n,
            "total_tokens": 10 + 2 * n + version,
        },
        "choices": [],
    }
    if n % 4:
        output["spend"] = n / 1000 + version
    item: dict[str, object] = {"input": {"messages": []}, "output": output}
    if n % 5 < 2 and not version:
        item["operation"] = {
            "status": "error" if n % 11 == 0 else "ok",
            "latency_ms": 10.0 * n,
            "ttft_ms": float(n),
        }
    return encode_event(
        kind="register",
        project="p-daily",
        container=f"c{n % 2}",
        completion_id=f"cmpl-{n}",
        received_at_ms=1_767_225_600_000 + version,
        item=item,
    )


async def _daily_as_computed(ch: ClickHouse, migrate_0014: Callable[[], Awaitable[None]]) -> None:
    """Completions stored, ``migrate_0014`` called once some are, more stored and some of them
    registered again; then usage_daily must hold, per day, what the completions add up to."""
    await insert_rows(ch, b"\n".join(_row(_usage_event(n)) for n in range(0, 120)))
    await migrate_0014()
    await insert_rows(ch, b"\n".join(_row(_usage_event(n)) for n in range(120, 200)))
    again = [n for n in range(200) if n % 5 >= 2 and n % 7 == 0]  # registered again, untimed
    retracted = await retractions(ch, "p-daily", [f"cmpl-{n}" for n in again])
    assert len(retracted) == len(again)
    newer = [_row(_usage_event(n, version=5)) for n in again]
    await insert_rows(ch, b"\n".join(retracted + newer))

    keys = "bucket, container, model, provider"
    daily = await ch.rows(
        f"SELECT {keys}, sum(requests), sum(errors), sum(unpriced), sum(prompt_tokens), "
        "sum(completion_tokens), sum(total_tokens), sum(spend), "
        "quantilesMerge(0.5, 0.9, 0.99)(latency_ms), quantilesMerge(0.5, 0.9, 0.99)(ttft_ms) "
        f"FROM {{database}}.usage_daily WHERE project = 'p-daily' GROUP BY {keys} ORDER BY {keys}"
    )
    computed = await ch.rows(
        "SELECT toStartOfDay(created) AS bucket, container, model, provider, count(), "
        "countIf(status = 'error'), countIf(spend IS NULL), sum(prompt_tokens), "
        "sum(completion_tokens), sum(total_tokens), sum(ifNull(spend, 0)), "
        "quantilesIf(0.5, 0.9, 0.99)(toFloat32(latency_ms), latency_ms IS NOT NULL), "
        "quantilesIf(0.5, 0.9, 0.99)(toFloat32(ttft_ms), ttft_ms IS NOT NULL) "
        "FROM {database}.completions FINAL WHERE project = 'p-daily' "
        f"GROUP BY {keys} ORDER BY {keys}"
    )
    assert len(daily) == 3 * 2  # three days, two (container, model) pairs
    assert [list(r) for r in daily] == [list(r) for r in computed]
    assert sum(r[4] for r in daily) == 200
    assert sum(r[5] for r in daily) == len([n for n in range(200) if n % 5 < 2 and n % 11 == 0])
    assert not any(math.isnan(q) for r in daily for q in r[-2] + r[-1])  # each day timed

    views = {
        r[0]
        for r in await ch.rows(
            "SELECT name FROM system.tables WHERE database = {db:String} AND name LIKE 'usage_%'",
            {"db": ch.database},
        )
    }
    assert views == {"usage_hourly", "usage_hourly_mv", "usage_daily", "usage_daily_from_hourly_mv"}


async def test_usage_daily_adds_up_each_day_as_computed_from_the_completions(
    clickhouse: ClickHouse,
) -> None:
    """0014: usage_daily is fed from usage_hourly; per day it holds what the stored
    completions add up to, a completion registered again counted once, in its newer form."""

    async def migrated_already() -> None:
        pass

    await _daily_as_computed(clickhouse, migrated_already)


async def test_usage_daily_stays_exact_across_migration_0014(clickhouse: ClickHouse) -> None:
    """What the view of 0004 summed into usage_daily stays, and what follows adds to it."""
    async with database_before(clickhouse, 14) as before:

        async def migrate_0014() -> None:
            await apply_migrations(before, 14)

        await _daily_as_computed(before, migrate_0014)
