"""A database as an earlier release left it: the migrations before one applied, the rest later."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from services.common.clickhouse import ClickHouse
from services.common.migrations import load_migrations


async def apply_migrations(ch: ClickHouse, first: int, last: int | None = None) -> None:
    """Apply migrations ``first`` to ``last`` (to the newest when None), in order."""
    for migration in load_migrations():
        if migration.version >= first and (last is None or migration.version <= last):
            for statement in migration.statements:
                await ch.command(statement)


@contextlib.asynccontextmanager
async def database_before(clickhouse: ClickHouse, migration: int) -> AsyncIterator[ClickHouse]:
    """A database of its own with every migration before ``migration`` applied; dropped after."""
    before = clickhouse.with_database(f"{clickhouse.database}_before_{migration:04d}")
    await before.command("CREATE DATABASE {database}")
    try:
        await apply_migrations(before, 1, migration - 1)
        yield before
    finally:
        await before.command("DROP DATABASE IF EXISTS {database}")
