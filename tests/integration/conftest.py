"""A producer on the session broker, for tests that put messages on topics directly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from services.common.kafka import create_producer
from tests.conftest import Broker


@pytest_asyncio.fixture(loop_scope="session")
async def producer(broker: Broker) -> AsyncIterator[Any]:
    p = create_producer(broker.bootstrap, linger_ms=0)
    await p.start()
    yield p
    await p.stop()
