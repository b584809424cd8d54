from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.gateway.upstream import error_body, retry_after_s

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("30", 30),
        ("0.2", 1),
        ("0", 0),
        ("-5", 0),
        ("86400", 3600),
        ("Thu, 01 Jan 2026 12:00:20 GMT", 20),
        ("Thu, 01 Jan 2026 11:00:00 GMT", 0),
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str | None, seconds: int | None) -> None:
    assert retry_after_s(header, now=NOW) == seconds


@pytest.mark.parametrize(
    ("raw", "message", "error"),
    [
        (b'{"error": {"message": "bad", "code": 1}}', "bad", {"message": "bad", "code": 1}),
        (b'{"error": {"code": 1}}', "upstream error", {"code": 1}),
        (b'{"error": "plain"}', "plain", {"error": "plain"}),
        (b"<html>502</html>", "<html>502</html>", None),
        (b"", "upstream error", None),
    ],
)
def test_error_body_in_openais_shape_or_not(raw: bytes, message: str, error: Any) -> None:
    assert error_body(raw) == (message, error)
