"""Session fixtures: one real Tansu broker and one real chDB engine for the whole run.

Each test gets its own ClickHouse database and its own topics, so tests never see each
other's data. Tests under ``tests/integration`` and ``tests/e2e`` are marked ``kafka`` and
``clickhouse`` automatically; unit tests are blocked from both (see tests/unit/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio

from services.common.clickhouse import ClickHouse, ClickHouseTarget
from services.common.kafka import EmbeddedBroker, ensure_topics
from services.common.migrations import migrate
from services.common.settings import ServeSettings
from tests.support.s3 import s3rver

ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if ROOT / "integration" in path.parents or ROOT / "e2e" in path.parents:
            item.add_marker(pytest.mark.kafka)
            item.add_marker(pytest.mark.clickhouse)


BACKEND = os.environ.get("MANIAC_TEST_BACKEND", "embedded")
"""``embedded`` (Tansu + chDB, the default) or ``docker`` (real Kafka and ClickHouse images)."""


class Broker(Protocol):
    @property
    def bootstrap(self) -> str: ...


@dataclass(frozen=True)
class ExternalBroker:
    bootstrap: str


@pytest.fixture(scope="session")
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    if BACKEND == "docker":
        yield ExternalBroker(request.getfixturevalue("docker_kafka"))
        return
    embedded = EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log")
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.fixture
def s3_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A local S3 server for this test and the variables that point Tansu at it."""
    with s3rver(tmp_path / "s3") as variables:
        yield variables


@pytest.fixture(scope="session")
def clickhouse_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClickHouse]:
    """The session's one engine (a process may open only one chDB directory)."""
    if BACKEND == "docker":
        yield request.getfixturevalue("docker_clickhouse")
        return
    target = ClickHouseTarget.embedded(tmp_path_factory.mktemp("chdb"))
    engine = ClickHouse.connect(target)
    yield engine
    engine.close()


def docker_available() -> bool:
    """True when a Docker engine answers (checked on its socket before asking the client)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(host.removeprefix("unix://"))
        except OSError:
            return False
    try:
        import docker

        client = docker.from_env()
    except Exception:
        return False
    try:
        client.ping()
    except Exception:
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def docker_kafka() -> Iterator[str]:
    """A real Apache Kafka (KRaft) in Docker; skipped where no Docker engine runs."""
    if not docker_available():
        pytest.skip("no Docker engine here: the testcontainers Kafka backend is skipped")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer("apache/kafka:3.9.1") as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def docker_clickhouse() -> Iterator[ClickHouse]:
    """A real ClickHouse server in Docker over HTTP; skipped where no Docker engine runs."""
    if not docker_available():
        pytest.skip("no Docker engine here: the testcontainers ClickHouse backend is skipped")
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = (
        DockerContainer("clickhouse/clickhouse-server:25.8")
        .with_exposed_ports(8123)
        .with_env("CLICKHOUSE_USER", "maniac")
        .with_env("CLICKHOUSE_PASSWORD", "maniac")
    )
    with container:
        wait_for_logs(container, "Ready for connections", timeout=120)
        host = container.get_container_host_ip()
        port = container.get_exposed_port(8123)
        url = f"http://maniac:maniac@{host}:{port}/maniac"
        engine = ClickHouse.connect(ClickHouseTarget.parse(url))
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
async def topics(broker: Broker) -> tuple[str, str]:
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


async def eventually(
    check: Callable[[], Awaitable[object]], timeout_s: float = 20.0, interval_s: float = 0.05
) -> None:
    """Await ``check()`` until it returns truthy; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")
