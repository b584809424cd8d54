"""What every service's FastAPI app has: the error envelope, health, and the spec."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from functools import cache
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import OPENAPI_PATH
from services.common.errors import install_error_handlers
from services.common.observe import RequestMetrics
from services.common.ratelimit import RateLimitHeaders
from services.common.responses import JSONResponse

ReadinessCheck = Callable[[], Awaitable[bool]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any]]]


@cache
def api_spec() -> dict[str, Any]:
    """The API contract, served as this app's OpenAPI document."""
    text = OPENAPI_PATH.read_text(encoding="utf-8")
    spec: dict[str, Any] = json.loads(text)
    return spec


health = APIRouter(tags=["Health"])


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the broker and ClickHouse this service needs are reachable."""
    checks: dict[str, ReadinessCheck] = request.state.readiness
    results = {name: await check() for name, check in checks.items()}
    ready = all(results.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": results},
        status_code=200 if ready else 503,
    )


@health.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_base_app(title: str, lifespan: Lifespan, routers: list[APIRouter]) -> FastAPI:
    app = FastAPI(title=title, lifespan=lifespan, default_response_class=JSONResponse)
    install_error_handlers(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(RequestMetrics)
    app.include_router(health)
    for router in routers:
        app.include_router(router)
    app.openapi = api_spec  # type: ignore[method-assign]
    return app
