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


def _runnable(sql: str) -> str:
    return (
        sql.replace("${project}", "p")
        .replace("$__timeFilter(bucket)", "bucket >= '2000-01-01' AND bucket < '2100-01-01'")
        .replace("maniac.", "{database}.")
    )


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
async def test_dashboard_query_runs(clickhouse: ClickHouse, panel: dict[str, Any]) -> None:
    process = processor(PriceCatalog.load())
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    rows = []
    for i in range(3):
        item = {
            "input": {"messages": []},
            "output": {"choices": [], "model": "openai/gpt-4o", "usage": usage, "created": 1.75e9},
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
    [target] = panel["targets"]
    answer = await clickhouse.rows(_runnable(target["rawSql"]))
    assert answer, panel["title"]
