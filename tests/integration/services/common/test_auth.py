from __future__ import annotations

import asyncio

from services.common.auth import KeyStore
from services.common.clickhouse import ClickHouse


async def test_created_key_authenticates_its_project_only(clickhouse: ClickHouse) -> None:
    store = KeyStore(clickhouse, refresh_s=60)
    key_a = await store.create("projA")
    key_b = await store.create("projB")
    assert await store.authenticate(key_a) == "projA"
    assert await store.authenticate(key_b) == "projB"
    assert await store.authenticate(key_a + "x") is None
    assert await store.authenticate("") is None


async def test_keys_are_stored_only_as_salted_hashes(clickhouse: ClickHouse) -> None:
    store = KeyStore(clickhouse)
    key = await store.create("projA")
    await store.add("projB", "shared-secret")
    dump = str(await clickhouse.rows("SELECT * FROM {database}.api_keys"))
    assert key not in dump
    assert "shared-secret" not in dump


async def test_seeding_the_same_key_twice_is_idempotent(clickhouse: ClickHouse) -> None:
    store = KeyStore(clickhouse)
    await store.add("projA", "key1")
    await store.add("projA", "key1")
    assert await store.count() == 1


async def test_revoked_key_stops_working_after_refresh(clickhouse: ClickHouse) -> None:
    store = KeyStore(clickhouse, refresh_s=0.05)
    other = KeyStore(clickhouse, refresh_s=0.05)  # another process's copy
    key = await store.create("projA")
    assert await other.authenticate(key) == "projA"
    [(kid, _)] = await store.list()
    assert await store.revoke(kid) == 1
    await asyncio.sleep(0.06)
    assert await other.authenticate(key) is None
    assert await store.revoke(kid) == 0
