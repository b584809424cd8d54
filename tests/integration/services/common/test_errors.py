"""The error handler against the real ClickHouse client's own failures."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import clickhouse_connect
import httpx
from fastapi import APIRouter, FastAPI

from services.common.app import create_base_app


@contextlib.asynccontextmanager
async def _no_state(_: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
    yield {}


async def test_a_clickhouse_server_that_does_not_answer_is_a_503_to_retry() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    router = APIRouter()

    @router.get("/reads")
    async def reads() -> None:
        # the real client's own failure: connecting runs a first query
        clickhouse_connect.get_client(host="127.0.0.1", port=port, connect_timeout=2)

    transport = httpx.ASGITransport(app=create_base_app("test", _no_state, [router]))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/reads")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": {
            "code": "service_unavailable",
            "message": "ClickHouse did not answer; try again shortly.",
            "details": None,
        }
    }
