"""The gateway as its own process: `maniac gateway`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI

from services.common.app import create_base_app
from services.common.clickhouse import ClickHouse
from services.common.kafka import broker_reachable
from services.common.ratelimit import RateLimiter
from services.common.runtime import (
    clickhouse_target,
    prepare_clickhouse,
    prepare_topics,
    require_bootstrap,
)
from services.common.settings import GatewaySettings
from services.gateway.dead_letters import router as dead_letters_router
from services.gateway.endpoints import router
from services.gateway.services import Gateway


def create_app(settings: GatewaySettings) -> FastAPI:
    bootstrap = require_bootstrap(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        clickhouse = ClickHouse.connect(clickhouse_target(settings))
        keys = await prepare_clickhouse(clickhouse, settings)
        await prepare_topics(bootstrap, settings)
        gateway = await Gateway.start(settings, bootstrap, clickhouse)
        try:
            yield {
                "settings": settings,
                "keys": keys,
                "rate_limiter": RateLimiter(settings.rate_limit_per_minute),
                **gateway.state(),
                # writes need the broker only; keys stay loaded while ClickHouse is away
                "readiness": {"broker": lambda: broker_reachable(bootstrap)},
            }
        finally:
            await gateway.stop()
            clickhouse.close()

    return create_base_app("Maniac gateway", lifespan, [router, dead_letters_router])
