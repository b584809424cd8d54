"""HTTP to OpenAI-compatible upstreams: one pooled client, one attempt per call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from services.common.codec import JSONDecodeError, dumps, loads
from services.gateway.providers import Route

# Statuses after which the next model in `models` is tried.
# (409 is not among them: a conflict is the caller's to resolve, and is passed through.)
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


@dataclass
class Attempt:
    """One upstream call of a logical completion."""

    provider: str
    model: str
    status: int | None = None
    outcome: str = "pending"  # ok | retryable | caller_error | timeout | connect_error
    latency_ms: float | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "outcome": self.outcome,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "usage": self.usage,
        }


class UpstreamClient:
    def __init__(self, max_connections: int = 1000) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _request(self, route: Route, body: dict[str, Any], stream: bool) -> httpx.Request:
        headers = {"Content-Type": "application/json", **route.provider.headers}
        key = route.provider.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if stream:
            headers["Accept"] = "text/event-stream"
        return self._client.build_request(
            "POST",
            f"{route.provider.base_url}/chat/completions",
            content=dumps(body),
            headers=headers,
            timeout=httpx.Timeout(
                route.provider.timeout_s, connect=min(10.0, route.provider.timeout_s)
            ),
        )

    async def send(
        self, route: Route, body: dict[str, Any], attempt: Attempt, *, stream: bool
    ) -> httpx.Response | None:
        """Send one attempt; None (with ``attempt`` filled in) when no response came back."""
        started = time.perf_counter()
        try:
            response = await self._client.send(self._request(route, body, stream), stream=stream)
        except httpx.TimeoutException as exc:
            attempt.outcome, attempt.error = "timeout", f"{type(exc).__name__}: upstream timed out"
        except httpx.TransportError as exc:
            attempt.outcome, attempt.error = "connect_error", f"{type(exc).__name__}: {exc}"
        else:
            attempt.status = response.status_code
            attempt.latency_ms = round((time.perf_counter() - started) * 1000, 1)
            if response.status_code == 200:
                attempt.outcome = "ok"
            else:
                attempt.outcome = (
                    "retryable"
                    if response.status_code in RETRYABLE or response.status_code >= 500
                    else "caller_error"
                )
            return response
        attempt.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        return None


def error_body(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """The message and the error object of an upstream error body (OpenAI's shape or not)."""
    try:
        parsed = loads(raw) if raw else None
    except JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        return str(error.get("message") or "upstream error"), error
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return parsed["error"], parsed
    text = raw[:500].decode("utf-8", "replace").strip()
    return text or "upstream error", None
