"""Every query of the shipped Grafana dashboard runs on the real engine and sees the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.events import encode_event
from services.common.clickhouse import ClickHouse
from services.common.pricing import PriceCatalog
from services.worker.pipeline import processor
from services.worker.pipeline.types import Row
from services.worker.runner import insert_rows

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy/grafana/dashboards/maniac-usage.json"
PANELS = json.loads(DASHBOARD.read_text())["panels"]


CREATED = 1.75e9
"""When the test's completions were created: 2025-06-15 14:13:20 UTC, their hour's bucket 14:00."""


def _runnable(sql: str, start: int = 946_684_800, end: int = 4_102_444_800) -> str:
    """``sql`` as the Grafana plugin sends it for a window from ``start`` to ``end`` (Unix
    seconds; 2000 to 2100 by default): its time macros are ``toDateTime(seconds)``."""
    return (
        sql.replace("${project}", "p")
        .replace("$__fromTime", f"toDateTime({start})")
        .replace("$__toTime", f"toDateTime({end})")
        .replace("maniac.", "{database}.")
    )


async def _store_three(clickhouse: ClickHouse) -> None:
    """Three completions of project ``p``, container ``c``, the first an error."""
    process = processor(PriceCatalog.load())
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    rows = []
    for i in range(3):
        item = {
            "input": {"messages": []},
            "output": {"choices": [], "model": "openai/gpt-4o", "usage": usage, "created": CREATED},
            "operation": {"status": "error" if i == 0 else "ok", "latency_ms": 100.0 * (i + 1)},
        }
        value = encode_event(
            kind="create",
            project="p",
            container="c",
            completion_id=f"g-{i}",
            received_at_ms=1,
            item=item,
        )
        result = process(value)
        assert isinstance(result, Row)
        rows.append(result.json)
    await insert_rows(clickhouse, b"\n".join(rows))


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
async def test_dashboard_query_runs(clickhouse: ClickHouse, panel: dict[str, Any]) -> None:
    await _store_three(clickhouse)
    [target] = panel["targets"]
    answer = await clickhouse.rows(_runnable(target["rawSql"]))
    assert answer, panel["title"]


async def test_a_window_that_starts_within_an_hour_counts_that_hour(clickhouse: ClickHouse) -> None:
    await _store_three(clickhouse)
    [top] = [p for p in PANELS if p["title"] == "Top containers"]
    # "the last 24 hours" seen at 14:43:20 the next day: the completions of 14:13 are in it
    start = int(CREATED) + 1800
    answer = await clickhouse.rows(_runnable(top["targets"][0]["rawSql"], start, start + 86_400))
    assert [row[:3] for row in answer] == [("c", 3, 45)]
