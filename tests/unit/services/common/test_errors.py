from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.common.app import create_base_app
from services.gateway.endpoints import router as gateway_router
from services.query.endpoints import router as query_router


@contextlib.asynccontextmanager
async def _no_state(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
    yield {}


def _app() -> FastAPI:
    """The gateway's and the query service's routes on one app, as `maniac serve` has them.

    Routing answers a wrong method before any dependency runs, so no state is needed.
    """
    return create_base_app("test", _no_state, [gateway_router, query_router])


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        pytest.param("PUT", "/v1/chat/completions", "GET, POST", id="list-and-create"),
        pytest.param("DELETE", "/v1/chat/completions/chatcmpl-1", "GET", id="get-by-id"),
        pytest.param("PATCH", "/v1/chat/completions/register", "GET, POST", id="register"),
    ],
)
async def test_method_not_allowed_names_every_method_of_the_path(
    method: str, path: str, allow: str
) -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": "Method Not Allowed", "details": None}
    }
