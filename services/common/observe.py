"""ASGI middleware counting requests and timing them, by route template (never by raw path)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import HTTP_REQUESTS, HTTP_SECONDS


class RequestMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                HTTP_REQUESTS.labels(scope["method"], template, str(message["status"])).inc()
                HTTP_SECONDS.labels(template).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, timed_send)
