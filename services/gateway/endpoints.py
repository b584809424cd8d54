"""Gateway routes: create a completion, register completed examples."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.responses import Response

from schemas.api import ChatReq, ChatRes, RegisterRes
from services.common.auth import ProjectDep
from services.common.codec import JSONDecodeError, loads
from services.common.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from services.common.metrics import REGISTER_ITEMS
from services.common.responses import JSONResponse
from services.common.settings import GatewaySettings
from services.gateway.budget import BodyBudget, Lease
from services.gateway.completions import CompletionService
from services.gateway.publisher import Publisher
from services.gateway.register import RegisterEnvelope, build_events
from services.gateway.validation import MAX_NESTING, nesting_exceeds, whole_floats_as_ints

router = APIRouter(tags=["Chat"])

# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, which costs more
# than the lookups themselves on the hot path.


async def _publisher(request: Request) -> Publisher:
    publisher: Publisher = request.state.publisher
    return publisher


async def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.state.settings
    return settings


async def _body_budget(request: Request) -> BodyBudget:
    budget: BodyBudget = request.state.body_budget
    return budget


PublisherDep = Annotated[Publisher, Depends(_publisher)]
BudgetDep = Annotated[BodyBudget, Depends(_body_budget)]
SettingsDep = Annotated[GatewaySettings, Depends(_settings)]


async def read_json_body(
    request: Request, max_bytes: int, lease: Lease | None, timeout_s: float
) -> object:
    """The request's JSON, refusing bodies over ``max_bytes`` before reading them whole.

    With a ``lease``, the body's bytes are taken from the gateway's in-flight budget as they
    arrive, before they are held in memory: a client that declares a large body and sends it
    slowly holds only what it sent. A body not received within ``timeout_s`` is a 400, so a
    client that stops sending does not hold its connection and its bytes for ever. A body
    sent with ``Content-Encoding: gzip`` is decompressed as it arrives, ``max_bytes`` then
    bounding what it decompresses to.
    """
    if not _json_content(request.headers.get("content-type")):
        raise RequestValidationError(
            [
                {
                    "type": "content_type",
                    "loc": ("body",),
                    "msg": "Send the body as JSON (Content-Type: application/json).",
                }
            ]
        )
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the body as it is or gzip it."
        )
    gzipped = encoding.endswith("gzip")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
    gunzip = Gunzip() if gzipped else None
    chunks: list[bytes] = []
    size = received_size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for received in request.stream():
                received_size += len(received)
                chunk = received if gunzip is None else gunzip.feed(received, max_bytes - size)
                size += len(chunk)
                if size > max_bytes or received_size > max_bytes:
                    raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
                if lease is not None:
                    lease.take(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"The request body was not received within {timeout_s:g} s.") from None
    except zlib.error as exc:
        raise BadRequest(f"The request body is not valid gzip: {exc}.") from None
    if gunzip is not None and not gunzip.complete:
        raise BadRequest("The request body is not valid gzip: it ends before its last block.")
    try:
        return loads(b"".join(chunks))
    except JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {exc}"}]
        ) from exc


class Gunzip:
    """gzip decompressed as it arrives, in members one after another (RFC 1952), with at most
    one byte more out of each call than asked for (the caller then refuses the body)."""

    def __init__(self) -> None:
        self._member = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes, room: int) -> bytes:
        out: list[bytes] = []
        while data and room >= 0:
            part = self._member.decompress(data, room + 1)
            out.append(part)
            room -= len(part)
            if self._member.eof:
                data = self._member.unused_data
                if data:  # another member (anything else is refused by zlib)
                    self._member = zlib.decompressobj(wbits=31)
            else:
                data = self._member.unconsumed_tail
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return self._member.eof


def _json_content(content_type: str | None) -> bool:
    """A body FastAPI would read as JSON: no Content-Type, ``application/json`` or ``+json``."""
    if not content_type:
        return True
    media = content_type.partition(";")[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def _completions(request: Request) -> CompletionService:
    service: CompletionService = request.state.completion_service
    return service


CompletionsDep = Annotated[CompletionService, Depends(_completions)]


M = TypeVar("M", bound=BaseModel)


MAX_VALIDATION_ERRORS = 50
"""Errors in a 422's ``detail`` at most: a body of a million bad parts gets fifty."""


def too_long(loc: tuple[str, ...], limit: int, what: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "too_long", "loc": ("body", *loc), "msg": f"At most {limit} {what}."}]
    )


async def read_model(
    request: Request,
    model: type[M],
    settings: GatewaySettings,
    lease: Lease | None = None,
    *,
    lists: Mapping[str, tuple[int, str]] | None = None,
) -> tuple[Any, M]:
    """The JSON body and its validation as ``model``; FastAPI's 422 when it is not one.

    Validated strictly, as JSON Schema types are: ``"1"`` is not a number nor ``"true"`` a
    boolean (a lax validation would pass them on upstream as they are), but ``1.0`` is an
    integer (:func:`whole_floats_as_ints`). ``lists``: top-level lists refused, before any
    validation, when longer than their limit (field -> (limit, what they hold)).
    """
    body = await read_json_body(
        request, settings.max_body_bytes, lease, settings.body_read_timeout_s
    )
    for field, (limit, what) in (lists or {}).items():
        value = body.get(field) if isinstance(body, dict) else None
        if isinstance(value, list) and len(value) > limit:
            raise too_long((field,), limit, what)
    try:
        return body, model.model_validate(body, strict=True)
    except ValidationError as exc:
        whole = {e["loc"][0] for e in exc.errors(include_url=False) if _whole_float(e)}
        if not whole:
            raise _invalid(exc) from exc
    # only the fields holding one are copied: a copy of a 64 MB body takes seconds
    fields = (
        {k: whole_floats_as_ints(v) if k in whole else v for k, v in body.items()}
        if isinstance(body, dict)
        else whole_floats_as_ints(body)
    )
    try:
        return body, model.model_validate(fields, strict=True)
    except ValidationError as exc:
        raise _invalid(exc) from exc


def _whole_float(error: ErrorDetails) -> bool:
    """An error that taking ``1.0`` as the integer it is would cure."""
    value = error.get("input")
    return error["type"] == "int_type" and isinstance(value, float) and value.is_integer()


MAX_ECHOED_INPUT = 200
"""Longest string a 422 gives back as an error's ``input``."""


def _invalid(exc: ValidationError) -> RequestValidationError:
    errors = exc.errors(include_url=False)[:MAX_VALIDATION_ERRORS]
    return RequestValidationError([_echoed({**e, "loc": ("body", *e["loc"])}) for e in errors])


def _echoed(error: dict[str, Any]) -> dict[str, Any]:
    """The error as a 422 reports it: its ``input`` only when that is a number, a boolean,
    null or a short string. An object or array refused (the whole body when a field is
    missing) is left out: FastAPI renders it value by value in Python, which took 37 s,
    blocking every request, and 3 GB for a 64 MB body, and failed with a 500 past about 500
    levels of nesting; a long string would be sent back whole."""
    value = error.get("input")
    if isinstance(value, dict | list) or (isinstance(value, str) and len(value) > MAX_ECHOED_INPUT):
        del error["input"]
    return error


@router.post("/v1/chat/completions", response_model=ChatRes)
async def create_completion(
    request: Request,
    project: ProjectDep,
    service: CompletionsDep,
    settings: SettingsDep,
    budget: BudgetDep,
) -> Response:
    """Create a chat completion using the specified model."""
    lists = {
        "messages": (settings.max_messages_per_request, "messages"),
        "models": (settings.max_models_per_request, "fallback models"),
    }
    with budget.lease(project) as lease:  # parsing a body costs memory: it counts while it is read
        body, chat = await read_model(request, ChatReq, settings, lease, lists=lists)
    if nesting_exceeds(body, MAX_NESTING):
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body",),
                    "msg": f"JSON nested more than {MAX_NESTING} levels deep.",
                }
            ]
        )
    return await service.create(project, body, chat)


@router.post("/v1/chat/completions/register", response_model=RegisterRes)
async def register(
    request: Request,
    project: ProjectDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    budget: BudgetDep,
) -> JSONResponse:
    """Register completed chat examples for evaluation and analytics."""
    with budget.lease(project) as lease:  # the body's bytes count until the broker has its items
        return await _register(request, project, publisher, settings, lease)


async def _register(
    request: Request, project: str, publisher: Publisher, settings: GatewaySettings, lease: Lease
) -> JSONResponse:
    envelope = (await read_model(request, RegisterEnvelope, settings, lease))[1]
    if len(envelope.items) > settings.max_items_per_request:
        raise too_long(("items",), settings.max_items_per_request, "items per request")
    validated = build_events(
        envelope,
        project=project,
        received_at_ms=time.time_ns() // 1_000_000,
        hold=lease.take_records,  # records held until the broker has them count too
    )
    container, received = envelope.container, len(envelope.items)
    # The parsed items (some 60 objects each) are done with: let them go before waiting for the
    # broker, so requests waiting their turn hold only their encoded records.
    del envelope
    await publisher.publish(validated.messages)
    REGISTER_ITEMS.labels("accepted").inc(validated.accepted)
    REGISTER_ITEMS.labels("rejected").inc(validated.rejected)
    return JSONResponse(
        {
            "ok": validated.rejected == 0,
            "container": container,
            "summary": {
                "received": received,
                "accepted": validated.accepted,
                "rejected": validated.rejected,
            },
            "errors": validated.errors,
        }
    )
