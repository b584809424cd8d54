"""Errors every service raises, and the one handler that renders them.

The tree::

    ManiacError                    500 internal_error
    ├── BadRequest                 400 bad_request
    ├── Unauthorized               401 unauthorized
    ├── NotFound                   404 not_found
    ├── PayloadTooLarge            413 payload_too_large
    ├── UnsupportedMediaType       415 unsupported_media_type
    ├── RateLimited                429 rate_limited
    └── ServiceUnavailable         503 service_unavailable

Every one renders as the spec's envelope ``{"error": {"code", "message", "details"}}``.
Request validation errors stay FastAPI's ``{"detail": [...]}`` with status 422. A ClickHouse
server that does not answer (clickhouse-connect's ``OperationalError``: refused, reset, timed
out) is a 503 ``service_unavailable`` with ``Retry-After``, not a 500: the request may be retried.
"""

from __future__ import annotations

from typing import Any, ClassVar

import structlog
from clickhouse_connect.driver.exceptions import OperationalError
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.common.logging import first_line
from services.common.responses import JSONResponse

log = structlog.get_logger(__name__)


class ManiacError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers

    def envelope(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(ManiacError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ManiacError):
    status_code = 401
    code = "unauthorized"


class NotFound(ManiacError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(ManiacError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ManiacError):
    status_code = 415
    code = "unsupported_media_type"


class RateLimited(ManiacError):
    status_code = 429
    code = "rate_limited"


class ServiceUnavailable(ManiacError):
    status_code = 503
    code = "service_unavailable"


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(exc: ManiacError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)


async def _maniac_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ManiacError)
    if exc.status_code >= 500:
        log.warning("request_failed", code=exc.code, message=exc.message)
    return error_response(exc)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method a route serves at the request's path, for a 405's ``Allow``.

    Starlette names only the methods of the first route whose path matched: PUT
    /v1/chat/completions was told ``POST`` although GET lists completions there. Each method
    is asked of every route (the routing's own match, so included routers count too).
    """
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": str(exc.detail), "details": None}}
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


CLICKHOUSE_RETRY_AFTER_S = 1


async def _clickhouse_unavailable(_: Request, exc: Exception) -> JSONResponse:
    log.warning("clickhouse_unavailable", error=first_line(exc))
    unavailable = ServiceUnavailable(
        "ClickHouse did not answer; try again shortly.",
        headers={"Retry-After": str(CLICKHOUSE_RETRY_AFTER_S)},
    )
    return error_response(unavailable)


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", error=repr(exc))
    return error_response(ManiacError("Internal server error."))


def install_error_handlers(app: FastAPI) -> None:
    """Render every error in the spec's envelope (422 validation errors excepted)."""
    app.add_exception_handler(ManiacError, _maniac_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _clickhouse_unavailable)
    app.add_exception_handler(Exception, _unhandled)
