"""Numbered ClickHouse migrations from ``schemas/clickhouse/NNNN_name.sql``.

Each file runs once per database, in order, and is recorded in ``schema_migrations``. Files are
never edited after they are merged: a change is a new file. ``{database}`` in a file is replaced
by the target database. Statements are separated by a ``;`` at the end of a line.
"""

from __future__ import annotations

import re
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
    done = {int(r[0]) for r in await ch.rows("SELECT version FROM {database}.schema_migrations")}
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
