"""GET /v1/status: ingestion lag and what was lost or is still pending, for the caller's project;
GET /v1/dead_letters: the project's dead letters and whether they were replayed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from services.common.auth import ProjectDep
from services.common.losses import LossRepository
from services.common.responses import JSONResponse

router = APIRouter(tags=["Status"])

PendingProbe = Callable[[], int]
"""Records acknowledged but not yet stored, from a worker in this process."""


async def _losses(request: Request) -> LossRepository:
    losses: LossRepository = request.state.losses
    return losses


async def _pending(request: Request) -> PendingProbe | None:
    probe: PendingProbe | None = request.state.pending
    return probe


@router.get("/v1/status")
async def get_status(
    project: ProjectDep,
    losses: Annotated[LossRepository, Depends(_losses)],
    pending: Annotated[PendingProbe | None, Depends(_pending)],
) -> JSONResponse:
    """Ingestion lag, stored, pending, dead-lettered and dropped records of the caller's project."""
    status: dict[str, Any] = {"object": "status", "project": project}
    status.update(await losses.status(project))
    # Partitions mix projects, so what is pending is known only for all of them together, and
    # only where a worker runs in this process (`maniac serve`).
    status["pending"] = None if pending is None else {"records": pending(), "scope": "all projects"}
    return JSONResponse(status)


@router.get("/v1/dead_letters")
async def list_dead_letters(
    project: ProjectDep,
    losses: Annotated[LossRepository, Depends(_losses)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    """The caller's newest dead letters: why, from where, and whether replayed."""
    data = await losses.list_dead_letters(project, limit)
    return JSONResponse({"object": "list", "data": data})
