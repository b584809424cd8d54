"""The usage endpoint's pure parts: times, buckets and dimensions from the query string."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from fastapi.exceptions import RequestValidationError

from services.query.usage import FIRST, LAST, buckets_over, parse_group_by, parse_time

DEFAULT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, DEFAULT),
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000.5", datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("2026-03-01T10:00:00Z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T10:00:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),  # naive is UTC
        (
            "2026-03-01T12:00:00+02:00",
            datetime(2026, 3, 1, 12, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_times_are_unix_seconds_or_iso_in_utc(value: str | None, expected: datetime) -> None:
    parsed = parse_time(value, DEFAULT, "start")
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize("value", ["yesterday", "nan", "inf", "1e300", ""])
def test_a_time_that_is_none_is_422_naming_its_parameter(value: str) -> None:
    with pytest.raises(RequestValidationError) as raised:
        parse_time(value, DEFAULT, "end")
    assert raised.value.errors()[0]["loc"] == ("query", "end")


@pytest.mark.parametrize(
    ("start", "end", "granularity", "expected"),
    [
        (
            datetime(2026, 1, 1, 10, 30, tzinfo=UTC),
            datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
            "hour",
            (datetime(2026, 1, 1, 10, tzinfo=UTC), datetime(2026, 1, 1, 12, tzinfo=UTC)),
        ),
        (
            datetime(2026, 1, 1, 10, 30, tzinfo=UTC),
            datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC),
            "hour",
            (datetime(2026, 1, 1, 10, tzinfo=UTC), datetime(2026, 1, 1, 13, tzinfo=UTC)),
        ),
        (
            datetime(2026, 1, 1, 23, tzinfo=UTC),
            datetime(2026, 1, 2, 1, tzinfo=UTC),
            "day",
            (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC)),
        ),
        (datetime(1900, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC), "day", (FIRST, LAST)),
    ],
)
def test_a_range_covers_the_whole_buckets_it_overlaps(
    start: datetime, end: datetime, granularity: str, expected: tuple[datetime, datetime]
) -> None:
    assert buckets_over(start, end, granularity) == expected  # type: ignore[arg-type]


def test_dimensions_are_known_and_each_taken_once() -> None:
    assert parse_group_by(None) == []
    assert parse_group_by("model, container,model") == ["model", "container"]
    with pytest.raises(RequestValidationError) as raised:
        parse_group_by("model,colour")
    assert "colour" in raised.value.errors()[0]["msg"]
