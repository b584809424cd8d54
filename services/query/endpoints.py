"""Query routes: list and get recorded completions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.convertors import PathConvertor, register_url_convertor

from schemas.api import ChatListRes, ChatResRelaxed
from services.common.auth import ProjectDep
from services.common.errors import NotFound
from services.query.repository import CompletionsRepository

router = APIRouter(tags=["Chat"])


async def _repository(request: Request) -> CompletionsRepository:
    repository: CompletionsRepository = request.state.completions
    return repository


RepositoryDep = Annotated[CompletionsRepository, Depends(_repository)]


class _RestOfPath(PathConvertor):
    """The rest of the path, whatever it holds. Starlette's ``path`` (``.*``) stops at a
    newline, and its route's closing ``$`` lets a trailing one go: an id ``a\\nb`` matched no
    route, and ``a\\n`` fetched ``a``."""

    regex = r"[\s\S]*"


register_url_convertor("rest", _RestOfPath())


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get("/v1/chat/completions", response_model=ChatListRes)
async def list_completions(
    project: ProjectDep,
    repository: RepositoryDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    model: str | None = None,
    container: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    """List chat completions captured in telemetry, scoped to the authenticated project."""
    page, total = await repository.list(
        project, limit=limit, offset=offset, model=model, container=container, order=order
    )
    data = ",".join(page).encode()
    return _json(b'{"object":"list","data":[' + data + b'],"total":' + str(total).encode() + b"}")


# ``:rest``: a registered id may hold a ``/`` (sent as ``%2F``, or as it is), or a newline
@router.get("/v1/chat/completions/{completion_id:rest}", response_model=ChatResRelaxed)
async def get_completion(
    completion_id: str, project: ProjectDep, repository: RepositoryDep
) -> Response:
    """Fetch a single chat completion by id within the authenticated project."""
    found = await repository.get(project, completion_id)
    if found is None:
        raise NotFound(f"No chat completion {completion_id!r} in this project.")
    return _json(found.encode())
