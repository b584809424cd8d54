"""The query service as its own process: `maniac query`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI

from services.common.app import create_base_app
from services.common.clickhouse import ClickHouse
from services.common.losses import LossRepository
from services.common.ratelimit import RateLimiter
from services.common.runtime import clickhouse_target, prepare_clickhouse
from services.common.settings import QuerySettings
from services.query.endpoints import router
from services.query.repository import CompletionsRepository
from services.query.status import router as status_router
from services.query.usage import UsageRepository
from services.query.usage import router as usage_router


def create_app(settings: QuerySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        clickhouse = ClickHouse.connect(clickhouse_target(settings))
        keys = await prepare_clickhouse(clickhouse, settings)
        try:
            yield {
                "settings": settings,
                "keys": keys,
                "rate_limiter": RateLimiter(settings.rate_limit_per_minute),
                "completions": CompletionsRepository(clickhouse),
                "usage": UsageRepository(clickhouse),
                "losses": LossRepository(clickhouse),
                "pending": None,  # no worker in this process
                "readiness": {"clickhouse": clickhouse.ping},
            }
        finally:
            clickhouse.close()

    return create_base_app("Maniac query service", lifespan, [router, usage_router, status_router])
