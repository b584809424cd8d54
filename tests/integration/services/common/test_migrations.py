from __future__ import annotations

from services.common.clickhouse import ClickHouse
from services.common.migrations import load_migrations, migrate


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


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))
