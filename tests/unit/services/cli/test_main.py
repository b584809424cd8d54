from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.cli.main import utc_time


def test_a_time_without_an_offset_is_utc_whatever_the_machines_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert utc_time("2025-06-01") == datetime(2025, 6, 1, tzinfo=UTC)
        assert utc_time("2025-06-01T12:30:00") == datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
        offset = utc_time("2025-06-01T12:00:00+02:00")
        assert offset == datetime(2025, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text", ["2025-13-01", "yesterday", ""])
def test_what_is_not_a_time_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO-8601 date or time"):
        utc_time(text)
