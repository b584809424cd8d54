"""The worker pipeline, composed in one place.

    Kafka ──getmany──▶ decode ─▶ transform + price ─▶ batch ─▶ deduplicate
                 ─▶ insert (ClickHouse; aggregates follow by materialized views)
                 ─▶ record dead letters (ClickHouse) ─▶ dead-letter (Kafka)
                 ─▶ commit offsets

Validation is in the two pure steps on one message: decode checks the event's envelope
(``CompletionEvent``), transform what storage needs of the item (timestamps, token counts and
spend in range); a message either refuses becomes a dead letter. Only the batch I/O is async.
They may run in child processes (``offload``, see :class:`ProcessPool`): the same function on
the same bytes, so the rows are the same wherever it runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
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
    process_safely,
)
from services.worker.pipeline.transform import to_row
from services.worker.pipeline.types import Invalid, Partition, Processed, Row


def processor(prices: PriceCatalog | None) -> Callable[[bytes | None], Row | Invalid]:
    """decode -> transform (with price), for one message."""

    def process(value: bytes | None) -> Row | Invalid:
        event = decode(value)
        if isinstance(event, Invalid):
            return event
        return to_row(event, prices)

    return process


process = processor(None)
"""The per-message steps without a price catalogue (spend only as the caller gave it)."""

Offload = Callable[[list[bytes | None]], Awaitable[list[Row | Invalid]]]

_child_process: Callable[[bytes | None], Row | Invalid] = process


def _start_child(prices: PriceCatalog | None) -> None:
    global _child_process
    _child_process = processor(prices)


def _process_in_child(values: list[bytes | None]) -> list[Row | Invalid]:
    return [process_safely(_child_process, value) for value in values]


class ProcessPool:
    """The per-message steps in ``processes`` child processes, for a worker that is CPU-bound.

    A batch's messages are split into one chunk per process; the event loop stays free while
    they are decoded and turned into rows (in `maniac serve`, for the gateway and the query
    service). Children are started with ``spawn``: the parent has ClickHouse and broker
    threads, which must not be forked.
    """

    def __init__(self, processes: int, prices: PriceCatalog | None) -> None:
        self.processes = processes
        self._executor = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child,
            initargs=(prices,),
        )

    async def __call__(self, values: list[bytes | None]) -> list[Row | Invalid]:
        loop = asyncio.get_running_loop()
        size = -(-len(values) // self.processes) or 1
        chunks = [values[i : i + size] for i in range(0, len(values), size)]
        results = await asyncio.gather(
            *(loop.run_in_executor(self._executor, _process_in_child, c) for c in chunks)
        )
        return [result for chunk in results for result in chunk]

    async def start(self) -> None:
        """Start every child now (each imports the pipeline), not with the first batch."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, _process_in_child, [])
                for _ in range(self.processes)
            )
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Pipeline:
    first: ProcessAndBatch
    write: WriteBatch
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
    max_bytes: int,
    retry_initial_s: float,
    retry_max_s: float,
    stopping: asyncio.Event,
    give_up: Callable[[], str | None] = lambda: None,
    offload: Offload | None = None,
) -> Pipeline:
    retrying = Retrying(retry_initial_s, retry_max_s, stopping, give_up)
    commit_step = CommitOffsets(commit, retrying)
    write_step = WriteBatch(insert, dead_letter, record_dead, retrying, next_step=commit_step)
    dedup_step = Deduplicate(lookup, retract, retrying, next_step=write_step)
    first = ProcessAndBatch(
        processor(prices),
        next_step=dedup_step,
        max_rows=max_rows,
        max_ms=max_ms,
        max_bytes=max_bytes,
        offload=offload,
    )
    return Pipeline(first=first, write=write_step, commit=commit_step)
