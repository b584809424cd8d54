"""Check, and rebuild, the tables derived from ``completions``.

The list's index (``completion_listing``), its totals (``completion_counts``) and the usage
aggregates (``usage_hourly``, and ``usage_daily`` from it) are written by materialized views at
insert time: nothing writes them again. When one loses rows (ClickHouse detaching a part it
found broken, after a disk filled up, say), the completions are still in ``completions``, but
the list no longer shows them all and the aggregates undercount. :func:`check` compares each
with ``completions``: the completions each counts, and each of its groups (an id of the list,
an hour of the usage) with every count and sum in it; :func:`rebuild` empties them and fills
them again from the current
version of every completion, through the views' own queries (read from ClickHouse, so they are
the ones the migrations created).

Run it while no worker writes: an insert between the emptying and the filling would be counted
twice or not at all. (Under ``maniac serve`` that is given: its embedded ClickHouse is open in
one process at a time.) An insert a worker on the embedded ClickHouse left unfinished (its
process killed) is finished first: emptying a table forgets the deduplication tokens of the
blocks it held, so the next worker, finishing it, would add it to the rebuilt tables again.
Every query is prepared before anything is emptied; a rebuild that fails while filling leaves
tables short, and is run again. Latency quantiles are rebuilt from the stored versions only:
those of completions replaced since (which the views could not retract) are no longer in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import structlog

from schemas import USAGE_COUNTS, USAGE_DIMENSIONS
from services.common.clickhouse import ClickHouse
from services.worker.journal import InsertJournal
from services.worker.runner import insert_unfinished

log = structlog.get_logger(__name__)

REBUILT = ("completion_listing", "completion_counts", "usage_hourly")
"""The tables filled from ``completions`` by a view; ``usage_daily`` follows ``usage_hourly``."""

EMPTIED = ("usage_daily", *REBUILT)


USAGE_KEYS = ("project", "bucket", *USAGE_DIMENSIONS)
USAGE_MEASURES = (*USAGE_COUNTS, "spend")
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "completion_listing": (
        ("project", "created", "completion_id", "model", "container"),
        ("sign",),
    ),
    "completion_counts": (("project", "model", "container"), ("completions",)),
    "usage_hourly": (USAGE_KEYS, USAGE_MEASURES),
    "usage_daily": (USAGE_KEYS, USAGE_MEASURES),
}
"""Per derived table, the key of its groups and the measures each group sums."""


@dataclass(frozen=True)
class Count:
    table: str
    expected: int
    found: int
    differing: int = 0
    """Groups whose measures differ from those computed from ``completions``."""

    @property
    def ok(self) -> bool:
        return self.expected == self.found and not self.differing


async def check(clickhouse: ClickHouse) -> list[Count]:
    """Completions each derived table counts, against those stored (after FINAL), and its
    groups whose counts or sums differ from what its view makes of the stored versions."""
    [(stored, listed, totals, hourly, daily)] = await clickhouse.rows(
        "SELECT "
        "(SELECT count() FROM {database}.completions FINAL WHERE agg_sign = 1), "
        "(SELECT sum(sign) FROM {database}.completion_listing), "
        "(SELECT sum(completions) FROM {database}.completion_counts), "
        "(SELECT sum(requests) FROM {database}.usage_hourly), "
        "(SELECT sum(requests) FROM {database}.usage_daily)"
    )
    found = dict(zip(GROUPS, (listed, totals, hourly, daily), strict=True))
    expected = await _expected(clickhouse)
    return [
        Count(table, int(stored), int(found[table]), await _differing(clickhouse, table, source))
        for table, source in expected.items()
    ]


async def _expected(clickhouse: ClickHouse) -> dict[str, str]:
    """Per derived table, a query of what it should hold: its view's query over the stored
    versions (``usage_daily``: what ``usage_hourly`` should hold, by day, as its view has it)."""
    views = await _views(clickhouse)
    keys = ", ".join(USAGE_KEYS[:1] + USAGE_KEYS[2:])
    sums = ", ".join(f"sum({m}) AS {m}" for m in USAGE_MEASURES)
    by_day = (
        f"SELECT {keys}, toDateTime(toStartOfDay(bucket), 'UTC') AS bucket, {sums} "
        f"FROM ({views['usage_hourly']}) GROUP BY ALL"
    )
    return {table: views.get(table, by_day) for table in GROUPS}


async def _differing(clickhouse: ClickHouse, table: str, expected: str) -> int:
    """Groups of ``table`` whose measures differ from those of ``expected`` (a group of
    ``table`` that nets to nothing is no group: a completion registered again elsewhere)."""
    keys, measures = GROUPS[table]
    group = ", ".join(keys)
    sums = ", ".join(f"sum({m}) AS {m}" for m in measures)
    held = " OR ".join(f"{m} != 0" for m in measures)
    left = ", ".join(f"e.{m}" for m in measures)
    right = ", ".join(f"f.{m}" for m in measures)
    [(n,)] = await clickhouse.rows(
        f"SELECT count() FROM (SELECT {group}, {sums} FROM ({expected}) GROUP BY {group}) AS e "
        f"FULL OUTER JOIN (SELECT {group}, {sums} FROM {{database}}.{table} GROUP BY {group} "
        f"HAVING {held}) AS f USING ({group}) "
        f"WHERE ({left}) != ({right}) "
        # both sides sorted and merged: 3,000,000 ids took 360 MB and 3.1 s this way, against
        # 640 MB and 3.8 s for the default hash join (chDB)
        "SETTINGS join_algorithm = 'full_sorting_merge'"
    )
    return int(n)


async def rebuild(clickhouse: ClickHouse) -> list[Count]:
    """Empty the derived tables and fill them from ``completions``; what :func:`check` says
    afterwards."""
    views = await _views(clickhouse)
    inserts = {}  # every query made, and checked by ClickHouse, before anything is emptied
    for table in REBUILT:
        columns = [row[0] for row in await clickhouse.rows(f"DESCRIBE ({views[table]})")]
        inserts[table] = f"INSERT INTO {{database}}.{table} ({', '.join(columns)}) {views[table]}"
    journal = InsertJournal.of(clickhouse)
    if journal is not None:  # before emptying: see the module
        await journal.finish(partial(insert_unfinished, clickhouse))
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
    missing = set(REBUILT) - views.keys()
    if missing:
        raise RuntimeError(f"no view from completions into {sorted(missing)}: migrate first")
    return views
