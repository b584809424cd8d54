"""Check, and rebuild, the tables derived from ``completions``.

The list's index (``completion_listing``), its totals (``completion_counts``) and the usage
aggregates (``usage_hourly``, and ``usage_daily`` from it) are written by materialized views at
insert time: nothing writes them again. When one loses rows (ClickHouse detaching a part it
found broken, after a disk filled up, say), the completions are still in ``completions``, but
the list no longer shows them all and the aggregates undercount. :func:`check` compares each
with ``completions``; :func:`rebuild` empties them and fills them again from the current
version of every completion, through the views' own queries (read from ClickHouse, so they are
the ones the migrations created).

Run it while no worker writes: an insert between the emptying and the filling would be counted
twice or not at all. (Under ``maniac serve`` that is given: its embedded ClickHouse is open in
one process at a time.) Every query is prepared before anything is emptied; a rebuild that
fails while filling leaves tables short, and is run again. Latency quantiles are rebuilt from
the stored versions only: those of completions replaced since (which the views could not
retract) are no longer in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import structlog

from services.common.clickhouse import ClickHouse

log = structlog.get_logger(__name__)

REBUILT = ("completion_listing", "completion_counts", "usage_hourly")
"""The tables filled from ``completions`` by a view; ``usage_daily`` follows ``usage_hourly``."""

EMPTIED = ("usage_daily", *REBUILT)


@dataclass(frozen=True)
class Count:
    table: str
    expected: int
    found: int

    @property
    def ok(self) -> bool:
        return self.expected == self.found


async def check(clickhouse: ClickHouse) -> list[Count]:
    """Completions each derived table counts, against those stored (after FINAL)."""
    [(stored, listed, totals, hourly, daily)] = await clickhouse.rows(
        "SELECT "
        "(SELECT count() FROM {database}.completions FINAL WHERE agg_sign = 1), "
        "(SELECT sum(sign) FROM {database}.completion_listing), "
        "(SELECT sum(completions) FROM {database}.completion_counts), "
        "(SELECT sum(requests) FROM {database}.usage_hourly), "
        "(SELECT sum(requests) FROM {database}.usage_daily)"
    )
    tables = ("completion_counts", "usage_hourly", "usage_daily")
    found = dict(zip(tables, (totals, hourly, daily), strict=True))
    return [
        Count("completion_listing", int(stored), int(listed)),
        *(Count(table, int(stored), int(value)) for table, value in found.items()),
    ]


async def rebuild(clickhouse: ClickHouse) -> list[Count]:
    """Empty the derived tables and fill them from ``completions``; what :func:`check` says
    afterwards."""
    views = await _views(clickhouse)
    missing = set(REBUILT) - views.keys()
    if missing:
        raise RuntimeError(f"no view from completions into {sorted(missing)}: migrate first")
    inserts = {}  # every query made, and checked by ClickHouse, before anything is emptied
    for table in REBUILT:
        columns = [row[0] for row in await clickhouse.rows(f"DESCRIBE ({views[table]})")]
        inserts[table] = f"INSERT INTO {{database}}.{table} ({', '.join(columns)}) {views[table]}"
    for table in EMPTIED:
        await clickhouse.command(f"TRUNCATE TABLE {{database}}.{table}")
    for table, insert in inserts.items():
        await clickhouse.command(insert)
        log.info("derived_table_rebuilt", table=table)
    return await check(clickhouse)


async def _views(clickhouse: ClickHouse) -> dict[str, str]:
    """Per table in :data:`REBUILT`, its view's query, reading the current version of every
    completion (``completions FINAL``, stored versions only) instead of inserted blocks."""
    database = f"`?{re.escape(clickhouse.database)}`?"  # quoted when it is a keyword
    source = re.compile(rf"\bFROM {database}\.`?completions\b`?(?:\s+AS\s+(\w+))?")
    target = re.compile(rf"\bTO {database}\.`?(\w+)")
    views: dict[str, str] = {}
    for create, select in await clickhouse.rows(
        "SELECT create_table_query, as_select FROM system.tables "
        "WHERE database = {db:String} AND engine = 'MaterializedView'",
        {"db": clickhouse.database},
    ):
        into, reads = target.search(create), source.search(select)
        if into is None or reads is None or into.group(1) not in REBUILT:
            continue
        alias = reads.group(1) or "completions"
        current = (
            f"FROM (SELECT * FROM {clickhouse.database}.completions FINAL "
            f"WHERE agg_sign = 1) AS {alias}"
        )
        views[into.group(1)] = select[: reads.start()] + current + select[reads.end() :]
    return views
