"""Numbered ClickHouse migrations from ``schemas/clickhouse/NNNN_name.sql``.

Each file runs once per database, in order, and is recorded in ``schema_migrations``. Files are
never edited after they are merged: a change is a new file. ``{database}`` in a file is replaced
by the target database. Statements are separated by a ``;`` at the end of a line.

Nothing stops two migrators from running the same file at once, and a file that backfills a
table (0007, 0008) would then fill it twice. So the services started on their own (``maniac
gateway``, ``worker``, ``query``: several at once on a cluster) never migrate; they wait until
every migration they know is applied (:func:`wait_for_schema`). What migrates is one process
at a time: ``maniac migrate`` (the compose file's ``migrate`` service, the Kubernetes Job) and
``maniac serve`` for its own embedded database. The operator's commands (``maniac keys``,
``reprice``, ``dlq``) never migrate: they refuse a database that lacks migrations.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import structlog

from schemas import MIGRATIONS_DIR
from services.common.clickhouse import ClickHouse

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in MIGRATIONS_DIR.iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        statements = tuple(s.strip() for s in re.split(r";\s*$", text, flags=re.M) if _sql(s))
        found.append(Migration(int(match[1]), match[2], statements))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers: {versions}")
    return found


def _sql(chunk: str) -> bool:
    lines = [
        line for line in chunk.splitlines() if line.strip() and not line.strip().startswith("--")
    ]
    return bool(lines)


async def migrate(ch: ClickHouse) -> list[int]:
    """Apply every migration not yet applied to ``ch.database``; return the versions applied."""
    await ch.command("CREATE DATABASE IF NOT EXISTS {database}")
    await ch.command(
        "CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = await _applied_versions(ch)
    applied: list[int] = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.statements:
            await ch.command(statement)
        await ch.command(
            "INSERT INTO {database}.schema_migrations (version, name) "
            "VALUES ({v:UInt32}, {n:String})",
            {"v": migration.version, "n": migration.name},
        )
        applied.append(migration.version)
        log.info("migration_applied", version=migration.version, name=migration.name)
    return applied


class SchemaNotReady(RuntimeError):
    """The database lacks migrations this code needs, and none were applied in time."""


async def missing_migrations(ch: ClickHouse) -> list[Migration]:
    """The migrations this code knows that are not applied to ``ch.database`` (in order)."""
    found = await ch.rows(
        "SELECT count() FROM system.tables "
        "WHERE database = {db:String} AND name = 'schema_migrations'",
        {"db": ch.database},
    )
    applied = await _applied_versions(ch) if found[0][0] else set()
    return [m for m in load_migrations() if m.version not in applied]


async def _applied_versions(ch: ClickHouse) -> set[int]:
    rows = await ch.rows("SELECT version FROM {database}.schema_migrations")
    return {int(r[0]) for r in rows}


async def wait_for_schema(ch: ClickHouse, *, timeout_s: float, poll_s: float = 2.0) -> None:
    """Return once every migration this code knows is applied to ``ch.database``.

    Raises :class:`SchemaNotReady` after ``timeout_s`` without. Migrations newer than this code
    (applied for a newer version during a rolling update) are fine: they only add.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        missing = await missing_migrations(ch)
        if not missing:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
            raise SchemaNotReady(
                f"ClickHouse database {ch.database!r} lacks migrations {names}: "
                "run `maniac migrate` (the services never migrate by themselves)"
            )
        log.info(
            "waiting_for_migrations",
            database=ch.database,
            missing=[m.version for m in missing],
            left_s=round(left, 1),
        )
        await asyncio.sleep(min(poll_s, left))
