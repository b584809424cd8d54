"""Create a chat completion: route, fall back across `models`, stream, and record.

One request is one logical completion (one operation id, one recorded completion), made of one
or more upstream attempts. An attempt that fails with 429, 5xx, a timeout or a connection error
hands over to the next model; an upstream 4xx that is the caller's fault ends the operation and
is passed through in the error envelope. The record is queued for Kafka after the answer is
complete (or the client went away), never on the way to the client's first byte.
"""

from __future__ import annotations

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
from services.gateway.shaping import StreamAccumulator, chat_res
from services.gateway.upstream import Attempt, UpstreamClient, error_body

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
    ttft_ms: float | None = None
    status: str = "ok"

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


async def _completion_body(response: httpx.Response, attempt: Attempt) -> dict[str, Any] | None:
    """The JSON object of a 200 answer; None, with ``attempt`` marked retryable, when it is
    not JSON or carries only an error (some upstreams answer a failure with 200): the next
    model is tried, as after a 5xx."""
    try:
        payload = loads(await response.aread())
    except JSONDecodeError:
        attempt.error = "upstream answered 200 with a body that is not JSON"
    else:
        if not isinstance(payload, dict):
            return {}
        if "error" not in payload or "choices" in payload:
            return payload
        message = error_body(dumps(payload))[0]
        attempt.error = f"upstream answered 200 with an error: {message}"
    finally:
        await response.aclose()
    attempt.outcome = "retryable"
    return None


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
            attempt = Attempt(provider=route.provider.name, model=route.slug)
            op.attempts.append(attempt)
            body = upstream_body(raw, route, force_usage=stream)
            response = await self.upstream.send(route, body, attempt, stream=stream)
            payload = None
            if response is not None and attempt.outcome == "ok" and not stream:
                payload = await _completion_body(response, attempt)
            UPSTREAM_ATTEMPTS.labels(route.provider.name, attempt.outcome).inc()
            if response is None or attempt.status == 200 and attempt.outcome != "ok":
                # no answer, or a 200 that holds no completion: the next model
                log.warning("upstream_attempt_failed", model=route.slug, error=attempt.error)
                continue
            if attempt.latency_ms is not None:
                UPSTREAM_LATENCY.labels(route.provider.name).observe(attempt.latency_ms / 1000)
            if attempt.outcome == "ok":
                op.route = route
                if stream:
                    return self._stream(op, response)
                assert payload is not None
                return self._complete(op, payload)
            raw_error = await response.aread()
            await response.aclose()
            message, error = error_body(raw_error)
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

    # -- outcomes -----------------------------------------------------------------------------

    def _complete(self, op: Operation, payload: dict[str, Any]) -> Response:
        assert op.route is not None
        op.ttft_ms = op.elapsed_ms()
        result = chat_res(
            payload,
            completion_id=op.completion_id,
            model=op.route.slug,
            provider=op.route.provider.name,
            container=op.route.container,
            created=op.received_at_ms // 1000,
        )
        op.attempts[-1].usage = result["usage"]
        self._record(op, result)
        return JSONResponse(result)

    def _stream(self, op: Operation, response: httpx.Response) -> StreamingResponse:
        wants_usage = bool(op.chat.stream_options and op.chat.stream_options.include_usage)
        return StreamingResponse(
            self._relay(op, response, wants_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _relay(
        self, op: Operation, response: httpx.Response, wants_usage: bool
    ) -> AsyncIterator[bytes]:
        """Forward each SSE event as it arrives, assembling the completion on the way."""
        assert op.route is not None
        acc = StreamAccumulator()
        done = False
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = loads(data)
                except JSONDecodeError:
                    continue
                if not isinstance(chunk, dict):
                    continue
                acc.add(chunk)
                if op.ttft_ms is None:
                    op.ttft_ms = op.elapsed_ms()
                if not wants_usage:
                    if not chunk.get("choices") and chunk.get("usage"):
                        continue  # the usage-only chunk the caller did not ask for
                    chunk.pop("usage", None)
                chunk["id"] = op.completion_id
                chunk["model"] = op.route.slug
                yield b"data: " + dumps(chunk) + b"\n\n"
            if done:
                yield b"data: [DONE]\n\n"
            else:  # the caller is told, not handed a [DONE] for a completion cut short
                op.status = "partial"
                op.attempts[-1].error = "upstream closed the stream without [DONE]"
                error = {
                    "error": {
                        "code": "upstream_stream_error",
                        "message": op.attempts[-1].error,
                    }
                }
                yield b"data: " + dumps(error) + b"\n\n"
        except httpx.HTTPError as exc:
            op.status = "partial"
            op.attempts[-1].error = f"stream broken: {type(exc).__name__}"
            error = {
                "error": {"code": "upstream_stream_error", "message": str(exc) or "stream broken"}
            }
            yield b"data: " + dumps(error) + b"\n\n"
        except BaseException:
            op.status = "partial"  # the client went away (cancelled): record what was produced
            op.attempts[-1].error = "client disconnected"
            raise
        finally:
            await response.aclose()
            result = {
                "id": op.completion_id,
                "object": "chat.completion",
                "created": acc.created or op.received_at_ms // 1000,
                "model": op.route.slug,
                "choices": acc.choices(),
                "usage": acc.usage,
                "provider": op.route.provider.name,
                "container": op.route.container,
            }
            op.attempts[-1].usage = acc.usage
            self._record(op, result)

    def _exhausted(self, op: Operation) -> ManiacError:
        last = op.attempts[-1]
        message = f"All {len(op.attempts)} upstream attempt(s) failed; last: {last.error}"
        if last.status == 429:
            return RateLimited(message, details=self._details(op), headers={"Retry-After": "1"})
        return ServiceUnavailable(message, details=self._details(op))

    @staticmethod
    def _details(op: Operation) -> dict[str, Any]:
        return {"operation_id": op.operation_id, "attempts": [a.as_dict() for a in op.attempts]}

    # -- recording ----------------------------------------------------------------------------

    def _record_failure(self, op: Operation, failure: ManiacError) -> None:
        op.status = "error"
        route = op.route
        last = op.attempts[-1] if op.attempts else None
        result = {
            "id": op.completion_id,
            "object": "chat.completion",
            "created": op.received_at_ms // 1000,
            "model": route.slug if route else (last.model if last else None),
            "choices": [],
            "usage": None,
            "provider": route.provider.name if route else (last.provider if last else None),
            "container": route.container if route else None,
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
