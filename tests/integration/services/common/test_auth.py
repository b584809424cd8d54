from __future__ import annotations

import asyncio

import pytest

from services.common.auth import KeyStore, RevokedKey, key_id
from services.common.clickhouse import ClickHouse
from tests.conftest import eventually


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

    async def rejected() -> bool:  # the first request after the interval starts the refresh
        return await other.authenticate(key) is None

    await eventually(rejected)
    assert await store.revoke(kid) == 0


async def test_a_revoked_key_is_never_added_again(clickhouse: ClickHouse) -> None:
    store = KeyStore(clickhouse, refresh_s=60)
    kid = await store.add("projA", "seeded-key")
    assert await store.revoke(kid) == 1
    with pytest.raises(RevokedKey):
        await store.add("projA", "seeded-key")  # what a restart seeding MANIAC_API_KEYS does
    assert await KeyStore(clickhouse).authenticate("seeded-key") is None
    assert await store.add("projA", "another-key") != kid  # other keys are unaffected


async def test_keys_already_loaded_keep_working_while_clickhouse_is_away(
    clickhouse: ClickHouse,
) -> None:
    store = KeyStore(clickhouse, refresh_s=0.01)
    key = await store.create("projA")
    await clickhouse.command("RENAME TABLE {database}.api_keys TO {database}.api_keys_away")
    try:
        await asyncio.sleep(0.02)
        with pytest.raises(Exception, match="api_keys"):
            await store.load()  # the store cannot be read...
        assert await store.authenticate(key) == "projA"  # ...so the copy loaded is kept
        assert await store.authenticate(key + "x") is None
    finally:
        await clickhouse.command("RENAME TABLE {database}.api_keys_away TO {database}.api_keys")
    assert await KeyStore(clickhouse).revoke(key_id(key)) == 1
    await asyncio.sleep(0.02)

    async def rejected() -> bool:  # and refreshed once it can be again
        return await store.authenticate(key) is None

    await eventually(rejected)


async def test_a_known_key_does_not_wait_for_the_keys_to_be_loaded_again(
    clickhouse: ClickHouse,
) -> None:
    store = KeyStore(clickhouse, refresh_s=1.0)
    key = await store.create("projA")
    await store.load()
    await asyncio.sleep(1.0)  # due for a load, and not yet twice as old
    # The client is busy (as behind a worker's insert): a reload would wait for it.
    busy = asyncio.create_task(clickhouse.rows("SELECT sleepEachRow(0.5) FROM numbers(2)"))
    await asyncio.sleep(0.1)
    assert await store.authenticate(key) == "projA"
    assert not busy.done()  # answered from the keys at hand, not after the reload
    await busy


async def test_after_a_quiet_spell_a_revoked_key_is_refused_at_once(
    clickhouse: ClickHouse,
) -> None:
    store = KeyStore(clickhouse, refresh_s=0.05)
    key = await store.create("projA")
    assert await store.authenticate(key) == "projA"
    assert await KeyStore(clickhouse).revoke(key_id(key)) == 1
    await asyncio.sleep(0.11)  # no request for twice the refresh interval
    assert await store.authenticate(key) is None


async def test_an_unknown_key_waits_for_the_keys_to_be_loaded_again(
    clickhouse: ClickHouse,
) -> None:
    store = KeyStore(clickhouse, refresh_s=0.01)
    await store.load()
    key = await KeyStore(clickhouse).create("projA")  # added by another process since
    await asyncio.sleep(0.02)
    assert await store.authenticate(key) == "projA"
