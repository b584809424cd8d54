"""structlog, set up once: console renderer in development, JSON lines in production."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import structlog

T = TypeVar("T")


def configure_logging(fmt: Literal["console", "json"] = "console", level: str = "info") -> None:
    """Configure structlog and route stdlib logging (uvicorn, aiokafka) through it."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks as plain text, never with local variables: those hold requests' headers
    # (API keys) and the settings (the ClickHouse URL's password).
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.processors.format_exc_info], processor=renderer
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)


def detached(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A background task that may outlive the request that starts it.

    A task copies its creator's context: one started inside a request would log every later
    event with that request's bound values (its project) whichever project the event is about.
    """
    return asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (ClickHouse's run to pages), or its repr."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)
