"""Session fixtures: one real Tansu broker and one real chDB engine for the whole run.

Each test gets its own ClickHouse database and its own topics, so tests never see each
other's data. Tests under ``tests/integration`` and ``tests/e2e`` are marked ``kafka`` and
``clickhouse`` automatically; unit tests are blocked from both (see tests/unit/conftest.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.clickhouse import ClickHouse, ClickHouseTarget
from services.common.kafka import EmbeddedBroker, ensure_topics
from services.common.migrations import migrate
from services.common.settings import ServeSettings

ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if ROOT / "integration" in path.parents or ROOT / "e2e" in path.parents:
            item.add_marker(pytest.mark.kafka)
            item.add_marker(pytest.mark.clickhouse)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log")
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.fixture(scope="session")
def clickhouse_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouse]:
    """The session's one chDB engine (a process may open only one chDB directory)."""
    target = ClickHouseTarget.embedded(tmp_path_factory.mktemp("chdb"))
    engine = ClickHouse.connect(target)
    yield engine
    engine.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(loop_scope="session")
async def clickhouse(
    clickhouse_engine: ClickHouse, request: pytest.FixtureRequest
) -> AsyncIterator[ClickHouse]:
    """A fresh, migrated database for one test."""
    if request.node.get_closest_marker("clickhouse") is None:
        pytest.fail("tests that touch ClickHouse must be marked 'clickhouse'")
    db = clickhouse_engine.with_database(unique("t"))
    await migrate(db)
    yield db
    await db.command("DROP DATABASE IF EXISTS {database}")


@pytest_asyncio.fixture(loop_scope="session")
async def topics(broker: EmbeddedBroker) -> tuple[str, str]:
    """A fresh completions topic and dead-letter topic for one test."""
    name = unique("completions")
    pair = (name, f"{name}.dlq")
    await ensure_topics(broker.bootstrap, list(pair), partitions=4)
    return pair


@pytest.fixture
def settings(topics: tuple[str, str], tmp_path: Path) -> ServeSettings:
    """Settings for one test: its topics, its consumer group, fast group joins."""
    return ServeSettings(
        topic=topics[0],
        dead_letter_topic=topics[1],
        consumer_group=unique("group"),
        data_dir=tmp_path,
        api_keys="projA:key-a,projB:key-b",
        session_timeout_ms=2_000,
        heartbeat_interval_ms=300,
        batch_max_ms=50,
        insert_retry_initial_s=0.05,
        insert_retry_max_s=0.5,
        keys_refresh_s=0.2,
    )


async def eventually(check: object, timeout_s: float = 20.0, interval_s: float = 0.05) -> None:
    """Await ``check()`` until it returns truthy; fail after ``timeout_s``."""
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")
