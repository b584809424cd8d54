"""HTTP to OpenAI-compatible upstreams: one pooled client, one attempt per call."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
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
    retry_after_s: int | None = None
    """The upstream's ``Retry-After`` on a 429, in whole seconds (not recorded)."""

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
            if response.status_code == 429:
                attempt.retry_after_s = retry_after_s(response.headers.get("retry-after"))
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


MAX_RETRY_AFTER_S = 3600


def retry_after_s(value: str | None, now: datetime | None = None) -> int | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in whole seconds, at most an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0, math.ceil(seconds)))


class StreamError(Exception):
    """The upstream sent an error event in the middle of a stream."""

    def __init__(self, message: str, error: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.message = message
        self.error = error


_DONE = object()


def _event(line: str) -> object:
    """An SSE ``data:`` line's chunk, ``_DONE``, or None (not an object: skipped)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        chunk = loads(data)
    except JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _stream_error(chunk: dict[str, Any]) -> StreamError | None:
    """An error event: a chunk with an ``error`` (OpenRouter's has choices too, finished with
    ``"error"``)."""
    if not chunk.get("error"):
        return None
    message, error = error_body(dumps(chunk))
    return StreamError(message, error)


class UpstreamStream:
    """A streamed answer whose first chunk has arrived: the chunks as dicts, in order.

    :attr:`done` tells, once the chunks are exhausted, whether the upstream ended with
    ``[DONE]``; an error event in the stream raises :class:`StreamError`.
    """

    def __init__(
        self,
        response: httpx.Response,
        first: list[dict[str, Any]],
        lines: AsyncIterator[str] | None = None,
    ) -> None:
        """``first``: the chunks already read; ``lines``: the lines still to come (None: the
        answer is whole, as when an upstream answers a stream request with one JSON body)."""
        self.response = response
        self._first = first
        self._rest = None if lines is None else self._read(lines)
        self.done = lines is None

    @classmethod
    async def open(cls, response: httpx.Response, attempt: Attempt) -> UpstreamStream | None:
        """Read up to the first chunk; None, with ``attempt`` marked retryable and the
        response closed, when the stream ends or fails first (the next model is tried)."""
        stream = cls(response, [], response.aiter_lines())
        assert stream._rest is not None
        try:  # (cancelled: the caller closes the response)
            stream._first.append(await anext(stream._rest))
        except StopAsyncIteration:
            error = "upstream stream ended before its first chunk"
        except StreamError as exc:
            error = f"upstream stream began with an error: {exc.message}"
        except httpx.HTTPError as exc:
            error = f"stream broken before its first chunk: {type(exc).__name__}"
        else:
            return stream
        await response.aclose()
        attempt.outcome, attempt.error = "retryable", error
        return None

    async def _read(self, lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
        async for line in lines:
            chunk = _event(line)
            if chunk is _DONE:
                self.done = True
                return
            if isinstance(chunk, dict):
                failed = _stream_error(chunk)
                if failed is not None:
                    raise failed
                yield chunk

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        while self._first:
            yield self._first.pop(0)
        if self._rest is not None:
            async for chunk in self._rest:
                yield chunk
