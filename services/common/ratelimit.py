"""Per-key rate limiting: a fixed window per API key, in this process.

Each process counts on its own, so N replicas of a service allow up to N times the limit; put
a shared limiter in front (the ingress) when that matters. Every authenticated response carries
``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (unix seconds); a
refused request gets 429 in the error envelope with ``Retry-After`` too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATE_KEY = "rate_limit_headers"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class RateLimiter:
    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.limit = per_minute
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def hit(self, key: str, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        start = now - (now % self.window_s)
        window, count = self._windows.get(key, (start, 0))
        if window != start:
            window, count = start, 0
            if len(self._windows) > 100_000:  # forget idle keys
                self._windows = {k: v for k, v in self._windows.items() if v[0] == start}
        reset = window + self.window_s
        allowed = count < self.limit
        if allowed:
            count += 1
            self._windows[key] = (window, count)
        return Decision(
            allowed=allowed,
            limit=self.limit,
            remaining=max(self.limit - count, 0),
            reset=math.ceil(reset),
            retry_after=max(math.ceil(reset - now), 1),
        )


class RateLimitHeaders:
    """ASGI middleware: adds the headers the auth dependency left in the request state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = scope.get("state", {}).get(STATE_KEY)
                if headers:
                    message["headers"] = [
                        *message.get("headers", []),
                        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
