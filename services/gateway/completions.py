"""Create a chat completion: route, fall back across `models`, stream, and record.

One request is one logical completion (one operation id, one recorded completion), made of one
or more upstream attempts. An attempt that fails with 408, 425, 429, a 5xx, a timeout or a
connection error, or answers 200 with no completion in it (a stream that ends or errs before
its first chunk), hands over to the next model; an upstream 4xx that is the caller's fault ends
the operation and is passed through in the error envelope. The record is queued for Kafka
after the answer is complete (or the client went away), never on the way to the client's first
byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from starlette.responses import Response, StreamingResponse

from schemas.api import ChatReq
from schemas.events import encode_event, message_key
from services.common.codec import JSONDecodeError, dumps, loads
from services.common.errors import BadRequest, ManiacError, RateLimited, ServiceUnavailable
from services.common.metrics import UPSTREAM_ATTEMPTS, UPSTREAM_LATENCY
from services.common.records import new_completion_id, normalize_slug
from services.common.responses import JSONResponse
from services.gateway.providers import Catalog, Route
from services.gateway.publisher import Publisher
from services.gateway.shaping import (
    StreamAccumulator,
    chat_res,
    completion_chunks,
    created_at,
    valid_usage,
)
from services.gateway.upstream import (
    Attempt,
    StreamError,
    UpstreamClient,
    UpstreamStream,
    error_body,
)

log = structlog.get_logger(__name__)

# Request fields that are the gateway's own and never sent upstream.
GATEWAY_FIELDS = frozenset({"model", "models", "tags", "store", "trace", "metadata"})
PASS_THROUGH_STATUSES = frozenset({400, 401, 402, 403, 404, 409})


class UpstreamFailed(ManiacError):
    """An upstream answered with an error that is the caller's to fix (status passed through)."""

    code = "upstream_error"

    def __init__(self, status: int, message: str, details: dict[str, Any]) -> None:
        super().__init__(message, details=details)
        self.status_code = status  # type: ignore[misc]


def candidate_models(chat: ChatReq) -> list[str]:
    """`model` first, then `models`, without repeats (`a/b` and `a:b` are one model)."""
    seen: list[str] = []
    for model in [chat.model, *(chat.models or [])]:
        if model and model.strip() and normalize_slug(model.strip()) not in seen:
            seen.append(normalize_slug(model.strip()))
    if not seen:
        raise BadRequest("Set `model` (or `models`) to a slug like 'openai/gpt-4o'.")
    return seen


def upstream_body(raw: dict[str, Any], route: Route, *, force_usage: bool) -> dict[str, Any]:
    """The request as the upstream gets it: everything the caller sent, minus gateway fields."""
    body = {k: v for k, v in raw.items() if k not in GATEWAY_FIELDS}
    body["model"] = route.upstream_model
    if force_usage:
        body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    return body


@dataclass
class Operation:
    """Everything recorded about one logical completion."""

    project: str
    raw: dict[str, Any]
    chat: ChatReq
    completion_id: str = field(default_factory=new_completion_id)
    operation_id: str = field(default_factory=lambda: f"op-{uuid.uuid4().hex}")
    started: float = field(default_factory=time.perf_counter)
    received_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    attempts: list[Attempt] = field(default_factory=list)
    route: Route | None = None
    """The route tried last: the one that answered, or the last to fail."""
    ttft_ms: float | None = None
    status: str = "ok"

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


async def _completion_body(response: httpx.Response, attempt: Attempt) -> dict[str, Any] | None:
    """The completion of a 200 answer; None, with ``attempt`` marked retryable, when it holds
    none (a body that is not JSON, not an object, only an error, or without ``choices``; some
    upstreams answer a failure with 200): the next model is tried, as after a 5xx."""
    try:
        payload = loads(await response.aread())
    except JSONDecodeError:
        attempt.error = "upstream answered 200 with a body that is not JSON"
    else:
        if not isinstance(payload, dict):
            attempt.error = "upstream answered 200 with JSON that is not an object"
        elif isinstance(payload.get("choices"), list):
            return payload
        elif "error" in payload:
            message = error_body(dumps(payload))[0]
            attempt.error = f"upstream answered 200 with an error: {message}"
        else:
            attempt.error = "upstream answered 200 without choices"
    finally:
        await response.aclose()
    attempt.outcome = "retryable"
    return None


def _is_json(response: httpx.Response) -> bool:
    media: str = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    return media == "application/json"


def _stream_error(message: str, upstream: dict[str, Any] | None = None) -> bytes:
    """The last event of a stream cut short, instead of ``[DONE]``."""
    error: dict[str, Any] = {"code": "upstream_stream_error", "message": message}
    if upstream is not None:
        error["details"] = {"upstream": upstream}
    return b"data: " + dumps({"error": error}) + b"\n\n"


class CompletionService:
    def __init__(self, catalog: Catalog, upstream: UpstreamClient, publisher: Publisher) -> None:
        self.catalog = catalog
        self.upstream = upstream
        self.publisher = publisher

    async def create(self, project: str, raw: dict[str, Any], chat: ChatReq) -> Response:
        routes = [self.catalog.resolve(m) for m in candidate_models(chat)]
        op = Operation(project, raw, chat)
        stream = bool(chat.stream)
        for route in routes:
            op.route = route
            attempt = Attempt(provider=route.provider.name, model=route.slug)
            op.attempts.append(attempt)
            answer = await self._attempt(op, route, attempt, stream=stream)
            UPSTREAM_ATTEMPTS.labels(route.provider.name, attempt.outcome).inc()
            if isinstance(answer, UpstreamStream):
                return self._stream(op, answer)
            if isinstance(answer, dict):
                return self._complete(op, answer)
            if answer is None:  # no answer, or a 200 that holds no completion: the next model
                log.warning("upstream_attempt_failed", model=route.slug, error=attempt.error)
                continue
            message, error = error_body(answer)
            attempt.error = message
            log.warning(
                "upstream_attempt_failed", model=route.slug, status=attempt.status, error=message
            )
            if attempt.outcome == "caller_error":
                assert attempt.status is not None
                status = attempt.status if attempt.status in PASS_THROUGH_STATUSES else 400
                failure: ManiacError = UpstreamFailed(
                    status,
                    message,
                    {"provider": route.provider.name, "model": route.slug, "upstream": error},
                )
                self._record_failure(op, failure)
                raise failure
        failure = self._exhausted(op)
        self._record_failure(op, failure)
        raise failure

    async def _attempt(
        self, op: Operation, route: Route, attempt: Attempt, *, stream: bool
    ) -> UpstreamStream | dict[str, Any] | bytes | None:
        """One upstream call, within the provider's ``timeout_s`` for all of it up to the
        answer (a whole body; a stream's first chunk). The answer: a stream under way, a
        completion, an error response's body, or None when there is none to use."""
        started = time.perf_counter()
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(route.provider.timeout_s):
                body = upstream_body(op.raw, route, force_usage=stream)
                response = await self.upstream.send(route, body, attempt, stream=stream)
                if response is None:
                    return None
                if attempt.latency_ms is not None:
                    UPSTREAM_LATENCY.labels(route.provider.name).observe(attempt.latency_ms / 1000)
                if attempt.outcome != "ok":
                    try:
                        return await response.aread()
                    finally:
                        await response.aclose()
                if stream and not _is_json(response):
                    opened = await UpstreamStream.open(response, attempt)
                    if opened is not None:
                        op.ttft_ms = op.elapsed_ms()
                    return opened
                payload = await _completion_body(response, attempt)
                if payload is None or not stream:
                    return payload
                # a JSON answer to a stream request: relayed as the stream it stands for
                result = self._result(op, payload)
                op.ttft_ms = op.elapsed_ms()
                return UpstreamStream(response, completion_chunks(result))
        except BaseException as exc:  # a timeout, or the client gone (cancelled)
            if response is not None:
                with contextlib.suppress(httpx.HTTPError):
                    await response.aclose()
            if not isinstance(exc, TimeoutError):
                raise
            attempt.outcome = "timeout"
            attempt.error = f"upstream gave no answer within {route.provider.timeout_s:g} s"
            attempt.latency_ms = round((time.perf_counter() - started) * 1000, 1)
            return None

    # -- outcomes -----------------------------------------------------------------------------

    def _result(self, op: Operation, payload: dict[str, Any]) -> dict[str, Any]:
        assert op.route is not None
        return chat_res(
            payload,
            completion_id=op.completion_id,
            model=op.route.slug,
            provider=op.route.provider.name,
            container=op.route.container,
            created=op.received_at_ms // 1000,
        )

    def _complete(self, op: Operation, payload: dict[str, Any]) -> Response:
        op.ttft_ms = op.elapsed_ms()
        result = self._result(op, payload)
        op.attempts[-1].usage = result["usage"]
        self._record(op, result)
        return JSONResponse(result)

    def _stream(self, op: Operation, stream: UpstreamStream) -> StreamingResponse:
        wants_usage = bool(op.chat.stream_options and op.chat.stream_options.include_usage)
        return StreamingResponse(
            self._relay(op, stream, wants_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _relay(
        self, op: Operation, stream: UpstreamStream, wants_usage: bool
    ) -> AsyncIterator[bytes]:
        """Forward each SSE event as it arrives, assembling the completion on the way."""
        assert op.route is not None
        acc = StreamAccumulator()
        created: int | float | None = None
        try:
            async for chunk in stream.chunks():
                acc.add(chunk)
                if created is None:  # as the record has it, the same in every chunk
                    created = created_at(acc.created, op.received_at_ms // 1000)
                if not wants_usage:
                    if not chunk.get("choices") and chunk.get("usage"):
                        continue  # the usage-only chunk the caller did not ask for
                    chunk.pop("usage", None)
                chunk["id"] = op.completion_id
                chunk["model"] = op.route.slug
                chunk["created"] = created
                yield b"data: " + dumps(chunk) + b"\n\n"
            if stream.done:
                yield b"data: [DONE]\n\n"
            else:  # the caller is told, not handed a [DONE] for a completion cut short
                op.status = "partial"
                op.attempts[-1].error = "upstream closed the stream without [DONE]"
                yield _stream_error(op.attempts[-1].error)
        except StreamError as exc:  # the upstream's own error event: passed on as ours
            op.status = "partial"
            op.attempts[-1].error = f"upstream sent an error mid-stream: {exc.message}"
            yield _stream_error(exc.message, exc.error)
        except httpx.HTTPError as exc:
            op.status = "partial"
            op.attempts[-1].error = f"stream broken: {type(exc).__name__}"
            yield _stream_error(str(exc) or "stream broken")
        except Exception as exc:  # a chunk the gateway cannot pass on: ended as cut short
            log.exception("stream_relay_failed", model=op.route.slug)
            op.status = "partial"
            op.attempts[-1].error = f"stream not relayed: {type(exc).__name__}"
            yield _stream_error("the gateway could not relay the upstream's stream")
        except BaseException:
            op.status = "partial"  # the client went away (cancelled): record what was produced
            op.attempts[-1].error = "client disconnected"
            raise
        finally:
            await stream.response.aclose()
            usage = valid_usage(acc.usage)
            result = {
                "id": op.completion_id,
                "object": "chat.completion",
                "created": created_at(acc.created, op.received_at_ms // 1000),
                "model": op.route.slug,
                "choices": acc.choices(),
                "usage": usage,
                "provider": op.route.provider.name,
                "container": op.route.container,
            }
            op.attempts[-1].usage = usage
            self._record(op, result)

    def _exhausted(self, op: Operation) -> ManiacError:
        last = op.attempts[-1]
        message = f"All {len(op.attempts)} upstream attempt(s) failed; last: {last.error}"
        if last.status == 429:
            retry_after = max(1, last.retry_after_s or 1)  # the upstream's, when it said
            return RateLimited(
                message, details=self._details(op), headers={"Retry-After": str(retry_after)}
            )
        return ServiceUnavailable(message, details=self._details(op))

    @staticmethod
    def _details(op: Operation) -> dict[str, Any]:
        return {"operation_id": op.operation_id, "attempts": [a.as_dict() for a in op.attempts]}

    # -- recording ----------------------------------------------------------------------------

    def _record_failure(self, op: Operation, failure: ManiacError) -> None:
        op.status = "error"
        route = op.route
        assert route is not None
        result = {
            "id": op.completion_id,
            "object": "chat.completion",
            "created": op.received_at_ms // 1000,
            "model": route.slug,
            "choices": [],
            "usage": None,
            "provider": route.provider.name,
            "container": route.container,
            "error": failure.envelope()["error"],
        }
        self._record(op, result)

    def _record(self, op: Operation, output: dict[str, Any]) -> None:
        if op.chat.store is False:
            return
        container = op.route.container if op.route else None
        item = {
            "input": op.raw,
            "output": output,
            "operation": {
                "id": op.operation_id,
                "status": op.status,
                "stream": bool(op.chat.stream),
                "ttft_ms": op.ttft_ms,
                "latency_ms": op.elapsed_ms(),
                "attempts": [a.as_dict() for a in op.attempts],
            },
        }
        value = encode_event(
            kind="create",
            project=op.project,
            container=container,
            completion_id=op.completion_id,
            received_at_ms=op.received_at_ms,
            item=item,
        )
        self.publisher.publish_nowait(message_key(op.project, op.completion_id), value)
