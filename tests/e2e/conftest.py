"""The whole stack (gateway, worker, query) over real HTTP on the session's broker and engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest_asyncio
import uvicorn

from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker, free_port
from services.common.settings import ServeSettings
from services.stack import Stack

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}


class RunningStack:
    def __init__(self, stack: Stack, base_url: str) -> None:
        self.stack = stack
        self.base_url = base_url

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)


StackFactory = Callable[..., Any]


@pytest_asyncio.fixture(loop_scope="session")
async def start_stack(
    settings: ServeSettings, broker: EmbeddedBroker, clickhouse: ClickHouse
) -> AsyncIterator[StackFactory]:
    """Start the stack (optionally with changed settings); stopped after the test."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> RunningStack:
        stack = Stack(settings.model_copy(update=overrides), clickhouse, broker.bootstrap)
        port = free_port()
        config = uvicorn.Config(
            stack.create_app(), host="127.0.0.1", port=port, log_config=None, lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        return RunningStack(stack, f"http://127.0.0.1:{port}")

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


@pytest_asyncio.fixture(loop_scope="session")
async def api(start_stack: StackFactory) -> RunningStack:
    running: RunningStack = await start_stack()
    return running
