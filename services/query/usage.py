"""GET /v1/usage: spend and token usage over time, from the aggregate tables."""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

from schemas import USAGE_COUNTS, USAGE_DIMENSIONS
from services.common.auth import ProjectDep
from services.common.clickhouse import ClickHouse
from services.common.records import normalize_slug
from services.common.responses import JSONResponse

router = APIRouter(tags=["Usage"])

DIMENSIONS = USAGE_DIMENSIONS
MEASURES = USAGE_COUNTS


def parse_time(value: str | None, default: datetime, name: str) -> datetime:
    """Unix seconds or ISO-8601 (naive means UTC)."""
    if value is None:
        return default
    try:
        moment = datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise _invalid(name, "expected unix seconds or an ISO-8601 time") from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    except (OverflowError, OSError) as exc:
        raise _invalid(name, "time out of range") from exc
    return moment.astimezone(UTC)


FIRST = datetime(1970, 1, 1, tzinfo=UTC)
LAST = datetime(2106, 1, 1, tzinfo=UTC)
"""The buckets' range (ClickHouse's ``DateTime``): times outside it are taken as its ends."""


def buckets_over(
    start: datetime, end: datetime, granularity: Literal["hour", "day"]
) -> tuple[datetime, datetime]:
    """The whole buckets that ``[start, end)`` overlaps: ``start`` rounded down and ``end`` up
    to the hour or the day (UTC), within :data:`FIRST` and :data:`LAST`. The aggregates hold
    whole buckets, so a range that cut one would count all of it or none of it."""
    step = timedelta(hours=1) if granularity == "hour" else timedelta(days=1)
    start, end = (min(max(moment, FIRST), LAST) for moment in (start, end))
    first, last = (FIRST + (moment - FIRST) // step * step for moment in (start, end))
    return first, last if last == end else last + step


def parse_group_by(value: str | None) -> list[str]:
    if not value:
        return []
    parts = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in parts if p not in DIMENSIONS]
    if unknown:
        raise _invalid("group_by", f"unknown dimension(s) {unknown}; use {list(DIMENSIONS)}")
    return list(dict.fromkeys(parts))


def _invalid(name: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": message}])


def _quantiles(values: Any) -> dict[str, float | None]:
    names = ("p50", "p90", "p99")
    return {
        n: (None if v is None or math.isnan(v) else round(float(v), 2))
        for n, v in zip(names, values or [None] * 3, strict=True)
    }


class UsageRepository:
    def __init__(self, clickhouse: ClickHouse) -> None:
        self._ch = clickhouse

    async def usage(
        self,
        project: str,
        *,
        granularity: Literal["hour", "day"],
        start: datetime,
        end: datetime,
        group_by: list[str],
        model: str | None,
        container: str | None,
    ) -> list[dict[str, Any]]:
        table = "usage_hourly" if granularity == "hour" else "usage_daily"
        where = [
            "project = {project:String}",
            "bucket >= {start:DateTime('UTC')}",
            "bucket < {end:DateTime('UTC')}",
        ]
        params: dict[str, Any] = {
            "project": project,
            "start": start.replace(tzinfo=None),
            "end": end.replace(tzinfo=None),
        }
        if model is not None:
            where.append("model = {model:String}")
            params["model"] = normalize_slug(model)
        if container is not None:
            where.append("container = {container:String}")
            params["container"] = container
        keys = ["bucket", *group_by]  # names from DIMENSIONS only, never from the request
        sums = ", ".join(f"sum({m})" for m in MEASURES)
        rows = await self._ch.rows(
            f"SELECT {', '.join(keys)}, {sums}, sum(spend), "
            "quantilesMerge(0.5, 0.9, 0.99)(latency_ms), quantilesMerge(0.5, 0.9, 0.99)(ttft_ms) "
            f"FROM {{database}}.{table} WHERE {' AND '.join(where)} "
            f"GROUP BY {', '.join(keys)} "
            # a group whose completions were all registered again elsewhere nets to nothing
            "HAVING sum(requests) != 0 "
            f"ORDER BY {', '.join(keys)}",
            params,
        )
        data = []
        for row in rows:
            bucket = row[0].replace(tzinfo=UTC)
            entry: dict[str, Any] = {"bucket": bucket.isoformat().replace("+00:00", "Z")}
            for i, dim in enumerate(group_by, start=1):
                entry[dim] = row[i] or None
            offset = 1 + len(group_by)
            for i, measure in enumerate(MEASURES):
                entry[measure] = int(row[offset + i])
            spend: Decimal = row[offset + len(MEASURES)]
            entry["spend"] = spend.normalize() if spend else Decimal(0)
            entry["latency_ms"] = _quantiles(row[offset + len(MEASURES) + 1])
            entry["ttft_ms"] = _quantiles(row[offset + len(MEASURES) + 2])
            data.append(entry)
        return data


async def _repository(request: Request) -> UsageRepository:
    repository: UsageRepository = request.state.usage
    return repository


DASHBOARD = Path(__file__).with_name("dashboard.html")


@functools.cache
def _dashboard_page() -> str:
    return DASHBOARD.read_text(encoding="utf-8")


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """A small page charting spend and tokens over time from /v1/usage (no build step)."""
    return HTMLResponse(_dashboard_page())


@router.get("/v1/usage")
async def get_usage(
    project: ProjectDep,
    repository: Annotated[UsageRepository, Depends(_repository)],
    group_by: Annotated[str | None, Query(description="container, model, provider")] = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
    model: str | None = None,
    container: str | None = None,
    granularity: Literal["hour", "day"] = "day",
) -> JSONResponse:
    """Spend and token usage per hour or day, for the caller's project."""
    now = datetime.now(UTC)
    end = parse_time(to, now, "to")
    start = parse_time(from_, end - timedelta(days=7), "from")
    if start >= end:
        raise _invalid("from", "`from` must be before `to`")
    dims = parse_group_by(group_by)
    start, end = buckets_over(start, end, granularity)
    data = await repository.usage(
        project,
        granularity=granularity,
        start=start,
        end=end,
        group_by=dims,
        model=model,
        container=container,
    )
    return JSONResponse(
        {
            "object": "usage",
            "granularity": granularity,
            "from": start.isoformat().replace("+00:00", "Z"),
            "to": end.isoformat().replace("+00:00", "Z"),
            "group_by": dims,
            "data": data,
        }
    )
