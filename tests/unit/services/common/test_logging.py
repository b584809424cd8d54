from __future__ import annotations

import asyncio
import io
import logging
import sys
from typing import Literal

import pytest
import structlog

from services.common.logging import configure_logging, detached

SECRET = "Bearer key-that-must-not-be-logged"


def _fail(authorization: str) -> None:
    headers = [(b"authorization", authorization.encode())]  # a local, as in an ASGI scope
    raise RuntimeError(f"failed with {len(headers)} header(s)")


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_tracebacks_are_logged_without_local_variables(
    fmt: Literal["console", "json"], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, uvicorn = logging.getLogger(), logging.getLogger("uvicorn.error")
    saved = (root.handlers[:], root.level, uvicorn.level, structlog.get_config())
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure_logging(fmt)
    try:
        try:
            _fail(SECRET)
        except RuntimeError:
            structlog.get_logger("t").exception("unhandled_error")
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        monkeypatch.undo()
        root.handlers[:], _, _, config = saved
        root.setLevel(saved[1])
        uvicorn.setLevel(saved[2])
        structlog.configure(**config)
    logged = err.getvalue()
    assert logged.count("failed with 1 header(s)") == 2  # both tracebacks are there
    assert "_fail" in logged
    assert "key-that-must-not-be-logged" not in logged


async def test_a_detached_task_starts_with_no_bound_values() -> None:
    async def bound() -> dict[str, object]:
        return structlog.contextvars.get_contextvars()

    with structlog.contextvars.bound_contextvars(project="projA"):
        inherited = await asyncio.create_task(bound())
        own = await detached(bound(), name="t")
    assert inherited == {"project": "projA"}  # what a plain task gets
    assert own == {}
