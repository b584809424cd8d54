from __future__ import annotations

import asyncio

import pytest

from services.common.clickhouse import ClickHouse, StringArray

NASTY = [
    "plain-id",
    "it's",
    "back\\slash",
    "trailing\\",
    "tick`",
    "tab\there",
    "new\nline",
    "{database}",
    "{ids:Array(String)}",
    "'); DROP TABLE completions; --",
    "ünïcødé ✓",
    "",
]


@pytest.mark.parametrize(
    "values",
    [NASTY, NASTY[:1], [f"chatcmpl-{n}" for n in range(2000)], []],
    ids=["escapes", "one", "many", "none"],
)
async def test_string_array_binds_every_value_exactly(
    clickhouse: ClickHouse, values: list[str]
) -> None:
    rows = await clickhouse.rows(
        "SELECT arrayJoin(arrayEnumerate(a)) AS n, a[n] FROM (SELECT {ids:Array(String)} AS a)",
        {"ids": StringArray(values)},
    )
    assert [row[1] for row in rows] == values


async def test_string_array_in_a_lookup_finds_the_ids_it_names(clickhouse: ClickHouse) -> None:
    await clickhouse.command(
        "CREATE TABLE {database}.ids (id String) ENGINE = MergeTree ORDER BY id"
    )
    await clickhouse.insert_rows("ids", [[v] for v in NASTY], ["id"])
    rows = await clickhouse.rows(
        "SELECT id FROM {database}.ids WHERE id IN {ids:Array(String)} ORDER BY id",
        {"ids": StringArray([*NASTY[1:6], "absent"])},
    )
    assert [row[0] for row in rows] == sorted(NASTY[1:6])


async def test_another_connection_reads_while_the_first_is_busy(clickhouse: ClickHouse) -> None:
    other = clickhouse.another_connection()
    try:
        assert other.database == clickhouse.database
        busy = asyncio.ensure_future(clickhouse.rows("SELECT sleep(1.5)"))
        await asyncio.sleep(0.2)  # the first client is now inside its call
        migrated = "SELECT toUInt8(count() > 0) FROM {database}.schema_migrations"
        assert await other.rows(migrated) == [(1,)]  # the same database, through the other
        assert not busy.done()  # answered while the first client was still busy
        await busy
    finally:
        other.close()
