"""Drop records: written in batches, kept while ClickHouse fails, bounded, counted when given up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from prometheus_client import REGISTRY

from services.common.losses import Dropped
from services.gateway.drops import DropRecorder


class Sink:
    def __init__(self) -> None:
        self.failing = False
        self.written: list[list[str]] = []

    async def record_dropped(self, drops: Sequence[Dropped]) -> None:
        if self.failing:
            raise ConnectionError("ClickHouse unavailable")
        self.written.append([d.completion_id for d in drops])


def _drop(i: int) -> Dropped:
    return Dropped("p", f"c{i}", "broker_error", "", datetime.now(UTC))


def _unwritten() -> float:
    return REGISTRY.get_sample_value("maniac_gateway_drop_records_unwritten_total") or 0.0


async def test_records_wait_while_clickhouse_fails_then_are_written_in_order() -> None:
    sink = Sink()
    recorder = DropRecorder(sink, max_buffer=10, interval_s=3600, batch=2)
    sink.failing = True
    for i in range(3):
        recorder.add(_drop(i))
    assert await recorder.write() is False
    sink.failing = False
    assert await recorder.write() is True
    assert sink.written == [["c0", "c1"], ["c2"]]
    await recorder.close()


async def test_a_full_buffer_gives_up_the_oldest_and_counts_them() -> None:
    sink = Sink()
    sink.failing = True
    before = _unwritten()
    recorder = DropRecorder(sink, max_buffer=3, interval_s=3600)
    for i in range(5):
        recorder.add(_drop(i))
    assert _unwritten() == before + 2
    await recorder.close(timeout_s=0.5)  # still failing: the rest is given up, and counted
    assert _unwritten() == before + 5
    assert sink.written == []


async def test_the_writer_logs_with_no_request_context() -> None:
    """Started by one project's request, the writer must not log every later drop as that one's."""
    seen: list[dict[str, object]] = []

    class Watching(Sink):
        async def record_dropped(self, drops: Sequence[Dropped]) -> None:
            seen.append(structlog.contextvars.get_contextvars())
            await super().record_dropped(drops)

    recorder = DropRecorder(Watching(), interval_s=0.01)
    with structlog.contextvars.bound_contextvars(project="projA"):
        recorder.add(_drop(0))
    await asyncio.sleep(0.1)  # the writer's interval, ten times over
    await recorder.close()
    assert seen
    assert seen[0] == {}
