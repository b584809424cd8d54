"""The worker pipeline, composed in one place.

    Kafka ──getmany──▶ decode ─▶ validate ─▶ transform + price ─▶ batch ─▶ deduplicate
                 ─▶ insert (ClickHouse; aggregates follow by materialized views)
                 ─▶ dead-letter (Kafka) ─▶ record dead letters (ClickHouse)
                 ─▶ commit offsets

decode/validate/transform are pure functions on one message; only the batch I/O is async.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.pricing import PriceCatalog
from services.worker.pipeline.decode import decode
from services.worker.pipeline.steps import (
    CommitOffsets,
    Deduplicate,
    Lookup,
    ProcessAndBatch,
    Retract,
    Retrying,
    WriteBatch,
)
from services.worker.pipeline.transform import to_row
from services.worker.pipeline.types import Invalid, Partition, Processed, Row


def processor(prices: PriceCatalog | None) -> Callable[[bytes | None], Row | Invalid]:
    """decode -> validate -> transform (with price), for one message."""

    def process(value: bytes | None) -> Row | Invalid:
        event = decode(value)
        if isinstance(event, Invalid):
            return event
        return to_row(event, prices)

    return process


process = processor(None)
"""The per-message steps without a price catalogue (spend only as the caller gave it)."""


@dataclass(frozen=True)
class Pipeline:
    first: ProcessAndBatch
    commit: CommitOffsets


def build_pipeline(
    *,
    insert: Callable[[bytes], Awaitable[None]],
    dead_letter: Callable[[list[Processed]], Awaitable[None]],
    record_dead: Callable[[list[Processed]], Awaitable[None]],
    commit: Callable[[dict[Partition, int]], Awaitable[None]],
    lookup: Lookup,
    retract: Retract,
    prices: PriceCatalog | None,
    max_rows: int,
    max_ms: int,
    retry_initial_s: float,
    retry_max_s: float,
    stopping: asyncio.Event,
) -> Pipeline:
    retrying = Retrying(retry_initial_s, retry_max_s, stopping)
    commit_step = CommitOffsets(commit, retrying)
    write_step = WriteBatch(insert, dead_letter, record_dead, retrying, next_step=commit_step)
    dedup_step = Deduplicate(lookup, retract, retrying, next_step=write_step)
    first = ProcessAndBatch(
        processor(prices), next_step=dedup_step, max_rows=max_rows, max_ms=max_ms
    )
    return Pipeline(first=first, commit=commit_step)
