"""Re-price stored completions after a price correction, without double counting.

For every completion created in ``[start, end)`` whose spend was computed (not given by the
caller) or could not be computed, the spend is computed again with the current catalogue. Each
completion whose spend changes is written again in one insert: a retraction of the stored row
(``agg_sign = -1``) and the re-priced row, one millisecond newer (``received_at`` is the
version the table keeps), so the aggregates move by exactly the difference.

Run it on history that is not being written at the same moment: a completion registered again
while it is re-priced could be counted from both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import structlog

from schemas import COMPLETIONS_INSERT_TABLE
from services.common.bodies import stored_responses
from services.common.clickhouse import ClickHouse
from services.common.codec import dumps
from services.common.pricing import PriceCatalog, compute_spend, spend_columns
from services.common.records import COUNT_FIELDS

log = structlog.get_logger(__name__)


@dataclass
class RepriceResult:
    examined: int = 0
    changed: int = 0
    delta: Decimal = Decimal(0)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def repriced(row: dict[str, Any], prices: PriceCatalog) -> dict[str, Any] | None:
    """The row's spend columns at current prices, or None when nothing changes."""
    counts = {k: int(row.get(k) or 0) for k in COUNT_FIELDS}
    price = prices.find(row["provider"], row["model"], _ts(row["created"]).timestamp())
    new = spend_columns(compute_spend(price, counts) if price else None)
    same = _dec(row["spend"]) == new["spend"] and row["price_version"] == new["price_version"]
    return None if same else new


async def reprice(
    clickhouse: ClickHouse,
    prices: PriceCatalog,
    start: datetime,
    end: datetime,
    *,
    project: str | None = None,
    dry_run: bool = False,
    chunk: int = 5_000,
) -> RepriceResult:
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    result = RepriceResult()
    condition = (
        "created >= {start:DateTime64(3, 'UTC')} AND created < {end:DateTime64(3, 'UTC')} "
        "AND spend_source IN ('computed', 'unknown')"
    )
    params: dict[str, Any] = {
        "start": start.astimezone(UTC).replace(tzinfo=None),
        "end": end.astimezone(UTC).replace(tzinfo=None),
    }
    if project is not None:
        condition += " AND project = {project:String}"
        params["project"] = project
    after: tuple[str, str] | None = None
    while True:  # pages of `chunk` rows in key order: the range is never held whole
        page, page_params = condition, dict(params)
        if after is not None:
            page += " AND (project, completion_id) > ({after_project:String}, {after_id:String})"
            page_params |= {"after_project": after[0], "after_id": after[1]}
        body = await clickhouse.json_each_row(
            f"SELECT * FROM {{database}}.completions FINAL WHERE {page} "
            "ORDER BY project, completion_id LIMIT {chunk:UInt32}",
            page_params | {"chunk": chunk},
        )
        rows = [orjson.loads(line) for line in body.splitlines() if line.strip()]
        changes: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for row in rows:
            result.examined += 1
            new = repriced(row, prices)
            if new is None:
                continue
            result.changed += 1
            result.delta += (new["spend"] or Decimal(0)) - (_dec(row["spend"]) or Decimal(0))
            changes.append((row, new))
        if changes and not dry_run:
            await _write(clickhouse, changes)
        if len(rows) < chunk:
            break
        after = (rows[-1]["project"], rows[-1]["completion_id"])
    log.info(
        "repriced",
        examined=result.examined,
        changed=result.changed,
        delta=str(result.delta),
        dry_run=dry_run,
    )
    return result


async def _write(
    clickhouse: ClickHouse, changes: list[tuple[dict[str, Any], dict[str, Any]]]
) -> None:
    """Each stored row's retraction and its re-priced version, whose response (stored apart,
    in ``completion_responses``) carries the new spend; one insert."""
    responses: dict[tuple[str, str], str] = {}
    for project in {row["project"] for row, _ in changes}:
        ids = [row["completion_id"] for row, _ in changes if row["project"] == project]
        found = await stored_responses(clickhouse, project, ids)
        responses |= {(project, i): text for i, text in found.items()}
    lines: list[bytes] = []
    for row, new in changes:
        stored = responses.get((row["project"], row["completion_id"]))
        if stored is None:  # every stored version has its response: the schema is not 0011's
            raise RuntimeError(f"no stored response for {row['project']}/{row['completion_id']}")
        response = orjson.loads(stored)
        response["spend"] = new["spend"]
        version = _ts(row["received_at"]) + timedelta(milliseconds=1)
        updated = {
            **row,
            **new,
            "agg_sign": 1,
            "received_at": version.replace(tzinfo=None).isoformat(" ", "milliseconds"),
            "response": dumps(response).decode(),
        }
        lines += [dumps({**row, "agg_sign": -1}), dumps(updated)]
    await clickhouse.insert_json_each_row(COMPLETIONS_INSERT_TABLE, b"\n".join(lines))
