"""Loss accounting in ClickHouse: dead letters and dropped telemetry, per project.

All SQL of the ``dead_letters`` and ``dropped`` tables (migration 0006) lives here, every value
a bound parameter. Workers record dead letters, the gateway records drops, ``maniac dlq``
lists and marks replays, and ``GET /v1/status`` reads the counts.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.common.clickhouse import ClickHouse

NOT_REPLAYED = datetime(1970, 1, 1, tzinfo=UTC)

Source = tuple[str, int, int, int]
"""Where a dead letter came from: (topic, partition, offset, timestamp in ms); its identity.

The timestamp tells apart records of different lives of one log (the embedded broker on memory
storage numbers from 0 again at every start); it is 0 where it was not recorded (migration
0012)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    project: str
    source_topic: str
    source_partition: int
    source_offset: int
    completion_id: str
    message_key: bytes
    reason: str
    dead_at: datetime
    payload: bytes
    replayed_at: datetime = NOT_REPLAYED
    source_timestamp: int = 0
    """The source record's Kafka timestamp (ms); 0 when unknown."""

    @property
    def source(self) -> Source:
        return (
            self.source_topic,
            self.source_partition,
            self.source_offset,
            self.source_timestamp,
        )


@dataclass(frozen=True, slots=True)
class Dropped:
    project: str
    completion_id: str
    reason: str
    error: str
    dropped_at: datetime


_DEAD_COLUMNS = (
    "project",
    "source_topic",
    "source_partition",
    "source_offset",
    "source_timestamp",
    "completion_id",
    "message_key",
    "reason",
    "dead_at",
    "replayed_at",
    "payload",
)
_DROPPED_COLUMNS = ("project", "completion_id", "reason", "error", "dropped_at")


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return _utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DEAD_LETTER_KEY = (
    ("project", "String"),
    ("source_topic", "String"),
    ("source_partition", "UInt32"),
    ("source_offset", "UInt64"),
    ("source_timestamp", "Int64"),
)
"""The dead-letter table's sorting key: its pages follow it, so that each reads a range."""

_KEY_COLUMNS = ", ".join(column for column, _ in _DEAD_LETTER_KEY)


def _key_compared(op: str, name: str, at: int = 0) -> str:
    """The sorting key ``op`` (``>`` or ``<=``) the parameters ``name0``.. as SQL, spelled out
    column by column: a comparison of tuples is not one the primary index reads a range for,
    and every page then read the whole table (100,000 dead letters in pages of 1,000: 8.5 s)."""
    column, kind = _DEAD_LETTER_KEY[at]
    value = f"{{{name}{at}:{kind}}}"
    if at == len(_DEAD_LETTER_KEY) - 1:
        return f"{column} {op} {value}"
    return (
        f"({column} {op[0]} {value} OR ({column} = {value} AND {_key_compared(op, name, at + 1)}))"
    )


def _key_parameters(name: str, key: Sequence[Any]) -> dict[str, Any]:
    return {f"{name}{at}": value for at, value in enumerate(key)}


class LossRepository:
    def __init__(self, clickhouse: ClickHouse) -> None:
        self._ch = clickhouse

    # -- writes ------------------------------------------------------------------------------

    async def record_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Insert dead letters (or their replayed versions) in one request."""
        if not letters:
            return
        rows = [
            (
                d.project,
                d.source_topic,
                d.source_partition,
                d.source_offset,
                d.source_timestamp,
                d.completion_id,
                d.message_key,
                d.reason,
                _utc(d.dead_at),
                _utc(d.replayed_at),
                d.payload,
            )
            for d in letters
        ]
        await self._ch.insert_rows("dead_letters", rows, _DEAD_COLUMNS)

    async def record_dropped(self, drops: Sequence[Dropped]) -> None:
        if not drops:
            return
        rows = [(d.project, d.completion_id, d.reason, d.error, _utc(d.dropped_at)) for d in drops]
        await self._ch.insert_rows("dropped", rows, _DROPPED_COLUMNS)

    # -- reads -------------------------------------------------------------------------------

    async def replayed(self, sources: Sequence[Source]) -> set[Source]:
        """Which of these dead letters were replayed already."""
        if not sources:
            return set()
        rows = await self._ch.rows(
            "SELECT source_topic, source_partition, source_offset, source_timestamp "
            "FROM {database}.dead_letters FINAL "
            "WHERE toUnixTimestamp64Milli(replayed_at) > 0 "
            "AND (source_topic, source_partition, source_offset, source_timestamp) "
            "IN {sources:Array(Tuple(String, UInt32, UInt64, Int64))}",
            {"sources": list(sources)},
        )
        return {(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def unreplayed_dead_letters(
        self, *, max_rows: int = 10_000, max_bytes: int = 16 * 1024 * 1024
    ) -> AsyncIterator[list[DeadLetter]]:
        """Every dead letter not replayed yet, payload and key included, in pages of at most
        ``max_rows`` and ``max_bytes`` of payloads (one larger than that is a page of its
        own), so what is held does not grow with the table.

        Pages follow the table's sorting key (project, then where each came from): each is
        chosen by its letters' keys and sizes first (after the last one of the page before),
        then read whole, both a range of the primary index. Each query costs tens of ms
        whatever it reads (FINAL): 100,000 letters take 1.8 s in pages of 10,000, 9 in pages of
        1,000, against 1.0 for all in one query, which held them all.
        """
        after: Sequence[Any] | None = None
        while True:
            past = "" if after is None else f"AND {_key_compared('>', 'after')} "
            known = {} if after is None else _key_parameters("after", after)
            keys = await self._ch.rows(
                f"SELECT {_KEY_COLUMNS}, length(payload) "
                "FROM {database}.dead_letters FINAL WHERE toUnixTimestamp64Milli(replayed_at) = 0 "
                f"{past}ORDER BY {_KEY_COLUMNS} LIMIT {{rows:UInt32}}",
                {**known, "rows": max_rows},
            )
            if not keys:
                return
            size, page = 0, 0
            for key in keys:
                size += int(key[-1])
                if page and size > max_bytes:
                    break
                page += 1
            last = keys[page - 1][:-1]
            rows = await self._ch.rows(
                "SELECT project, source_topic, source_partition, source_offset, source_timestamp, "
                "completion_id, hex(message_key), reason, dead_at, hex(payload) "
                "FROM {database}.dead_letters FINAL WHERE toUnixTimestamp64Milli(replayed_at) = 0 "
                f"{past}AND {_key_compared('<=', 'last')} ORDER BY {_KEY_COLUMNS}",
                {**known, **_key_parameters("last", last)},
            )
            yield self._dead_letters(rows)
            after = last

    @staticmethod
    def _dead_letters(rows: Sequence[Sequence[Any]]) -> list[DeadLetter]:
        return [
            DeadLetter(
                project=str(project),
                source_topic=str(topic),
                source_partition=int(partition),
                source_offset=int(offset),
                source_timestamp=int(timestamp),
                completion_id=str(completion_id),
                message_key=bytes.fromhex(key),
                reason=str(reason),
                dead_at=_utc(dead_at),
                payload=bytes.fromhex(payload),
            )
            for (
                project,
                topic,
                partition,
                offset,
                timestamp,
                completion_id,
                key,
                reason,
                dead_at,
                payload,
            ) in rows
        ]

    async def list_dead_letters(self, project: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest dead letters (without their payload), optionally of one project."""
        where = "WHERE project = {project:String}" if project is not None else ""
        rows = await self._ch.rows(
            "SELECT project, completion_id, reason, source_topic, source_partition, "
            "source_offset, dead_at, replayed_at, length(payload) "
            f"FROM {{database}}.dead_letters FINAL {where} "
            "ORDER BY dead_at DESC, source_offset DESC LIMIT {limit:UInt32}",
            {"project": project or "", "limit": limit},
        )
        return [
            {
                "project": r[0],
                "completion_id": r[1] or None,
                "reason": r[2],
                "source": f"{r[3]}/{r[4]}/{r[5]}",
                "dead_at": _iso(r[6]),
                "replayed_at": _iso(r[7]) if _utc(r[7]) > NOT_REPLAYED else None,
                "bytes": int(r[8]),
            }
            for r in rows
        ]

    async def status(self, project: str) -> dict[str, Any]:
        """Ingestion lag over the last hour and loss counts, for one project."""
        params = {"project": project}
        # agg_sign = 1 leaves out retractions. No FINAL (it would merge the whole project):
        # merges drop superseded versions, so the count is of completions, each once however
        # many of its versions were stored (the newest one, which a merge keeps, was stored
        # last), and the lag is over the versions still there.
        lag = await self._ch.rows(
            "SELECT uniqExact(completion_id), quantiles(0.5, 0.99)(lag), max(lag) FROM ("
            "SELECT completion_id, greatest(toInt64(toUnixTimestamp64Milli(inserted_at)) "
            "- toInt64(toUnixTimestamp64Milli(received_at)), 0) AS lag "
            "FROM {database}.completions "
            "WHERE project = {project:String} AND agg_sign = 1 "
            "AND inserted_at >= now64(3) - INTERVAL 1 HOUR)",
            params,
        )
        stored, quantiles, longest = lag[0]
        dead = await self._ch.rows(
            "SELECT reason, count(), countIf(dead_at >= now64(3) - INTERVAL 1 DAY), "
            "countIf(toUnixTimestamp64Milli(replayed_at) > 0) "
            "FROM {database}.dead_letters FINAL WHERE project = {project:String} "
            "GROUP BY reason ORDER BY count() DESC, reason",
            params,
        )
        dropped = await self._ch.rows(
            "SELECT reason, count(), countIf(dropped_at >= now64(3) - INTERVAL 1 DAY) "
            "FROM {database}.dropped FINAL WHERE project = {project:String} "
            "GROUP BY reason ORDER BY count() DESC, reason",
            params,
        )

        def ms(value: Any) -> int | None:
            if not stored or value is None or math.isnan(float(value)):
                return None
            return round(float(value))

        return {
            "ingestion_lag_ms": {
                "p50": ms(quantiles[0] if quantiles else None),
                "p99": ms(quantiles[1] if quantiles else None),
                "max": ms(longest),
                "window": "1h",
            },
            "stored_last_hour": int(stored),
            "dead_lettered": {
                "total": sum(int(r[1]) for r in dead),
                "last_24h": sum(int(r[2]) for r in dead),
                "replayed": sum(int(r[3]) for r in dead),
                "by_reason": {str(r[0]): int(r[1]) for r in dead},
            },
            "dropped": {
                "total": sum(int(r[1]) for r in dropped),
                "last_24h": sum(int(r[2]) for r in dropped),
                "by_reason": {str(r[0]): int(r[1]) for r in dropped},
            },
        }
