"""Start-up against the real engine and broker: who migrates, who waits, which topics."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from services.common.auth import key_id
from services.common.clickhouse import ClickHouse
from services.common.migrations import SchemaNotReady, migrate
from services.common.runtime import prepare_clickhouse, prepare_topics
from services.common.settings import CommonSettings
from tests.conftest import Broker, unique


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


async def test_a_restart_does_not_bring_back_a_seeded_key_that_was_revoked(
    clickhouse: ClickHouse,
) -> None:
    settings = CommonSettings(api_keys=SecretStr("projA:key-a,projB:key-b"))
    keys = await prepare_clickhouse(clickhouse, settings, apply_migrations=True)
    assert await keys.revoke(key_id("key-a")) == 1

    restarted = await prepare_clickhouse(clickhouse, settings, apply_migrations=True)
    assert await restarted.authenticate("key-a") is None
    assert await restarted.authenticate("key-b") == "projB"


async def _partitions(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {str(t["topic"]): len(t["partitions"]) for t in described}


@pytest.mark.parametrize(
    ("setting", "default", "created"),
    [
        pytest.param(None, 4, 4, id="a service on its own"),
        pytest.param(None, 1, 1, id="maniac serve"),
        pytest.param(3, 1, 3, id="MANIAC_TOPIC_PARTITIONS wins"),
    ],
)
async def test_topics_are_created_with_the_partitions_asked_for(
    broker: Broker, setting: int | None, default: int, created: int
) -> None:
    topic = unique("completions")
    settings = CommonSettings(
        topic=topic, dead_letter_topic=f"{topic}.dlq", topic_partitions=setting
    )
    await prepare_topics(broker.bootstrap, settings, partitions=default)
    # an existing topic keeps its partitions, whatever is asked the next time
    await prepare_topics(broker.bootstrap, settings.model_copy(update={"topic_partitions": 2}))
    assert await _partitions(broker.bootstrap, [topic, f"{topic}.dlq"]) == {
        topic: created,
        f"{topic}.dlq": created,
    }


async def test_topics_are_created_with_the_replication_factor_asked_for(broker: Broker) -> None:
    topic = unique("completions")
    settings = CommonSettings(
        topic=topic, dead_letter_topic=f"{topic}.dlq", topic_replication_factor=3
    )
    await prepare_topics(broker.bootstrap, settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic, f"{topic}.dlq"])
    finally:
        await admin.close()
    # Tansu keeps one copy whatever is asked, but reports the replicas it was asked for
    assert [len(p["replicas"]) for t in described for p in t["partitions"]] == [3] * 8
