"""Start-up against the real engine: who migrates, who waits."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from services.common.clickhouse import ClickHouse
from services.common.migrations import SchemaNotReady, migrate
from services.common.runtime import prepare_clickhouse
from services.common.settings import CommonSettings
from tests.conftest import unique


async def _tables(db: ClickHouse) -> set[str]:
    rows = await db.rows(
        "SELECT name FROM system.tables WHERE database = {db:String}", {"db": db.database}
    )
    return {str(r[0]) for r in rows}


async def test_a_service_on_its_own_never_migrates_it_waits_for_maniac_migrate(
    clickhouse_engine: ClickHouse,
) -> None:
    db = clickhouse_engine.with_database(unique("t"))
    settings = CommonSettings(migrations_wait_s=0.3, api_keys=SecretStr("projA:key-a"))
    try:
        with pytest.raises(SchemaNotReady):
            await prepare_clickhouse(db, settings)
        assert await _tables(db) == set()  # nothing created, no backfill started

        starting = asyncio.create_task(
            prepare_clickhouse(db, settings.model_copy(update={"migrations_wait_s": 60}))
        )
        await asyncio.sleep(0.3)
        assert not starting.done()
        await migrate(db)  # what `maniac migrate` does
        keys = await asyncio.wait_for(starting, timeout=15)
        assert await keys.authenticate("key-a") == "projA"
    finally:
        await db.command("DROP DATABASE IF EXISTS {database}")


async def test_maniac_serve_migrates_its_own_database(clickhouse_engine: ClickHouse) -> None:
    db = clickhouse_engine.with_database(unique("t"))
    try:
        keys = await prepare_clickhouse(
            db,
            CommonSettings(migrations_wait_s=0, api_keys=SecretStr("projA:key-a")),
            apply_migrations=True,
        )
        assert {"completions", "completion_listing", "api_keys"} <= await _tables(db)
        assert await keys.authenticate("key-a") == "projA"
    finally:
        await db.command("DROP DATABASE IF EXISTS {database}")
