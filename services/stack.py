"""Gateway, workers and query service in one process, on a given broker and ClickHouse.

``maniac serve`` runs this on the embedded defaults; the end-to-end tests run it on the test
session's broker and engine. Shutdown drains: the HTTP server stops taking requests first,
then the worker runs until every offset the gateway acknowledged is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import structlog
from fastapi import FastAPI

from services.common.app import create_base_app
from services.common.auth import KeyStore
from services.common.clickhouse import ClickHouse
from services.common.kafka import broker_reachable
from services.common.losses import LossRepository
from services.common.pricing import PriceCatalog
from services.common.ratelimit import RateLimiter
from services.common.runtime import SERVE_PARTITIONS, prepare_clickhouse, prepare_topics
from services.common.settings import ServeSettings
from services.gateway.dead_letters import router as dead_letters_router
from services.gateway.endpoints import router as gateway_router
from services.gateway.publisher import Publisher
from services.gateway.services import Gateway
from services.query.endpoints import router as query_router
from services.query.repository import CompletionsRepository
from services.query.status import router as status_router
from services.query.usage import UsageRepository
from services.query.usage import router as usage_router
from services.worker.runner import Worker, create_worker_consumer

log = structlog.get_logger(__name__)


async def bounded(work: Awaitable[Any], seconds: float, what: str) -> None:
    """Await a shutdown step, but never hang on it (a dead broker must not block exit)."""
    try:
        async with asyncio.timeout(seconds):
            await work
    except TimeoutError:
        log.error("shutdown_step_timed_out", step=what, seconds=seconds)
    except Exception as exc:
        log.error("shutdown_step_failed", step=what, error=repr(exc))


class Stack:
    def __init__(
        self,
        settings: ServeSettings,
        clickhouse: ClickHouse,
        bootstrap: str,
        *,
        create_dev_key: bool = False,
    ) -> None:
        self.settings = settings
        self.create_dev_key = create_dev_key
        self.clickhouse = clickhouse
        self.reads = clickhouse.another_connection()
        """The query service's own client: list and get never wait behind the worker's inserts."""
        self.bootstrap = bootstrap
        self.keys: KeyStore | None = None
        self.publisher: Publisher | None = None
        self.worker: Worker | None = None
        self.gateway: Gateway | None = None
        self._consumer: Any = None
        self._worker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        self.keys = await prepare_clickhouse(self.clickhouse, s, apply_migrations=True)
        if self.create_dev_key and s.api_keys is None and await self.keys.count() == 0:
            key = await self.keys.create("default")
            print(  # noqa: T201 - shown once, on purpose, to the person who started the server
                f"\nNo API keys configured: created a development key for project 'default':\n"
                f"\n    {key}\n\nIt is stored only as a hash; keep it now.\n",
                flush=True,
            )
        await prepare_topics(self.bootstrap, s, partitions=SERVE_PARTITIONS)
        self.gateway = await Gateway.start(s, self.bootstrap, self.clickhouse)
        self.publisher = self.gateway.publisher
        self._consumer = create_worker_consumer(self.bootstrap, s)
        await self._consumer.start()
        self.worker = Worker(
            s,
            self._consumer,
            self.gateway.producer,
            self.clickhouse,
            prices=PriceCatalog.load(s.pricing_file),
        )
        self._worker_task = asyncio.create_task(self.worker.run(), name="worker")
        self.publisher.limit_backlog(self.pending, s.max_backlog)

    async def stop(self) -> None:
        """Drain what the gateway acknowledged into ClickHouse, then stop everything."""
        if self.publisher is not None:
            await self.publisher.flush()
        if self.worker is not None and self.publisher is not None:
            task = self._worker_task
            if task is not None and not task.done():
                drained = await self.worker.drain(
                    dict(self.publisher.acked), self.settings.drain_timeout_s
                )
                log.info("drained", ok=drained, acked=self.publisher.acked)
            self.worker.stop()
            if task is not None:
                await bounded(task, 15, "worker_stop")
        if self._consumer is not None:
            await bounded(self._consumer.stop(), 10, "consumer_stop")
        if self.gateway is not None:
            await bounded(self.gateway.stop(), 45, "gateway_stop")
        self.reads.close()

    def pending(self) -> int:
        """Acknowledged records not yet stored (all projects: partitions mix them)."""
        if self.worker is None:
            return 0
        acked = dict(self.publisher.acked) if self.publisher is not None else {}
        return self.worker.pending(acked)

    def create_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
            await self.start()
            try:
                yield {
                    "settings": self.settings,
                    "keys": self.keys,
                    "rate_limiter": RateLimiter(self.settings.rate_limit_per_minute),
                    **(self.gateway.state() if self.gateway else {}),
                    "completions": CompletionsRepository(self.reads),
                    "usage": UsageRepository(self.reads),
                    "losses": LossRepository(self.reads),
                    "pending": self.pending,
                    "readiness": {
                        "broker": lambda: broker_reachable(self.bootstrap),
                        "clickhouse": self.reads.ping,
                    },
                }
            finally:
                await self.stop()

        return create_base_app(
            "Maniac Inference Gateway API",
            lifespan,
            [gateway_router, dead_letters_router, query_router, usage_router, status_router],
        )
