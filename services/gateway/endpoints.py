"""Gateway routes: create a completion, register completed examples."""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from schemas.api import ChatReq, ChatRes, RegisterRes
from services.common.auth import ProjectDep
from services.common.codec import JSONDecodeError, loads
from services.common.errors import PayloadTooLarge
from services.common.responses import JSONResponse
from services.common.settings import GatewaySettings
from services.gateway.budget import BodyBudget, Lease
from services.gateway.completions import CompletionService
from services.gateway.publisher import Publisher
from services.gateway.register import RegisterEnvelope, build_events
from services.gateway.validation import whole_floats_as_ints

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


async def read_json_body(request: Request, max_bytes: int, lease: Lease | None = None) -> object:
    """The request's JSON, refusing bodies over ``max_bytes`` before reading them whole.

    With a ``lease``, the body's bytes are taken from the gateway's in-flight budget as they
    arrive (all at once when the length is declared), before they are held in memory.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
        if lease is not None:
            lease.take(int(declared))
            lease = None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
        if lease is not None:
            lease.take(len(chunk))
        chunks.append(chunk)
    try:
        return loads(b"".join(chunks))
    except JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {exc}"}]
        ) from exc


async def _completions(request: Request) -> CompletionService:
    service: CompletionService = request.state.completion_service
    return service


CompletionsDep = Annotated[CompletionService, Depends(_completions)]


M = TypeVar("M", bound=BaseModel)


async def read_model(
    request: Request, model: type[M], max_bytes: int, lease: Lease | None = None
) -> tuple[Any, M]:
    """The JSON body and its validation as ``model``; FastAPI's 422 when it is not one.

    Validated strictly, as JSON Schema types are: ``"1"`` is not a number nor ``"true"`` a
    boolean (a lax validation would pass them on upstream as they are), but ``1.0`` is an
    integer (:func:`whole_floats_as_ints`).
    """
    body = await read_json_body(request, max_bytes, lease)
    try:
        return body, model.model_validate(body, strict=True)
    except ValidationError:
        pass
    try:
        return body, model.model_validate(whole_floats_as_ints(body), strict=True)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from exc


@router.post("/v1/chat/completions", response_model=ChatRes)
async def create_completion(
    request: Request, project: ProjectDep, service: CompletionsDep, settings: SettingsDep
) -> Response:
    """Create a chat completion using the specified model."""
    body, chat = await read_model(request, ChatReq, settings.max_body_bytes)
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
    with budget.lease() as lease:  # the body's bytes count until the broker has its items
        return await _register(request, project, publisher, settings, lease)


async def _register(
    request: Request, project: str, publisher: Publisher, settings: GatewaySettings, lease: Lease
) -> JSONResponse:
    envelope = (await read_model(request, RegisterEnvelope, settings.max_body_bytes, lease))[1]
    if len(envelope.items) > settings.max_items_per_request:
        raise RequestValidationError(
            [
                {
                    "type": "too_long",
                    "loc": ("body", "items"),
                    "msg": f"At most {settings.max_items_per_request} items per request.",
                }
            ]
        )
    validated = build_events(envelope, project=project, received_at_ms=time.time_ns() // 1_000_000)
    container, received = envelope.container, len(envelope.items)
    # The parsed items (some 60 objects each) are done with: let them go before waiting for the
    # broker, so requests waiting their turn hold only their encoded records.
    del envelope
    await publisher.publish(validated.messages)
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
