"""The whole stack (gateway, worker, query) over real HTTP on the session's broker and engine,
and a local OpenAI-compatible upstream for it to call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker
from services.common.settings import ServeSettings
from services.stack import Stack
from tests.conftest import Broker
from tests.support.serve import Serve
from tests.support.servers import serving
from tests.support.upstream import create_upstream

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}


class RunningStack:
    def __init__(self, stack: Stack, base_url: str) -> None:
        self.stack = stack
        self.base_url = base_url

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)


StackFactory = Callable[..., Awaitable[RunningStack]]


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[tuple[FastAPI, str]]:
    """The fake provider: its app (to read the requests it got) and its base URL."""
    app = create_upstream()
    async with serving(app) as url:
        yield app, url


@pytest.fixture
def providers_file(tmp_path: Path, upstream: tuple[FastAPI, str]) -> Path:
    path = tmp_path / "providers.toml"
    path.write_text(
        f"""
[providers.mock]
base_url = "{upstream[1]}/v1"
api_key_env = "MANIAC_TEST_MOCK_KEY"
timeout_s = 2

[providers.down]
base_url = "http://127.0.0.1:9/v1"
timeout_s = 2

[containers.support]
model = "mock/ok"

[containers.broken]
model = "mock/fail-500"
"""
    )
    return path


@pytest_asyncio.fixture(loop_scope="session")
async def start_stack(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, providers_file: Path
) -> AsyncIterator[StackFactory]:
    """Start the stack (optionally with changed settings); stopped after the test."""
    async with contextlib.AsyncExitStack() as running:

        async def start(
            bootstrap: str | None = None, own: EmbeddedBroker | None = None, **overrides: Any
        ) -> RunningStack:
            """``own``: a broker of the stack's own (as `maniac serve`'s), at ``bootstrap``."""
            changed = settings.model_copy(update={"providers_file": providers_file, **overrides})
            stack = Stack(changed, clickhouse, bootstrap or broker.bootstrap, broker=own)
            url = await running.enter_async_context(serving(stack.create_app()))
            return RunningStack(stack, url)

        yield start


@pytest_asyncio.fixture(loop_scope="session")
async def api(start_stack: StackFactory) -> RunningStack:
    return await start_stack()


@pytest_asyncio.fixture(loop_scope="session")
async def api_broker_gone(start_stack: StackFactory) -> RunningStack:
    """The stack on a broker of its own that died after start-up: it serves, it cannot record."""
    own = EmbeddedBroker()
    own.start()
    try:
        return await start_stack(bootstrap=own.bootstrap, publish_timeout_s=1.0)
    finally:
        own.kill()


@pytest.fixture
def env() -> dict[str, str]:
    """Environment for `maniac serve` processes: fast group joins, JSON logs."""
    return {
        **os.environ,
        "MANIAC_SESSION_TIMEOUT_MS": "2000",
        "MANIAC_HEARTBEAT_INTERVAL_MS": "300",
        "MANIAC_LOG_FORMAT": "json",
    }


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    """`maniac serve` processes a test started; killed after it if still running."""
    started: list[Serve] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.log_handle.close()
