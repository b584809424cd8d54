"""Replay dead letters once their cause is fixed: back to the completions topic, once each.

The whole dead-letter topic is read (no consumer group: every partition from its beginning to
its high watermark). Each record is selected by project (from its key) and reason (a substring
of its ``reason`` header), skipped when ClickHouse marks it replayed already, re-published with
its original key and value, and, once the broker acknowledged it, marked replayed in
``dead_letters`` (a newer version of its row; a dead letter from before that table existed gets
its row then). Marks rather than committed offsets remember what was replayed, so that a replay
of one project or one reason never hides the others from a later one.

A replayed message that is still invalid is dead-lettered again by the workers, as a new dead
letter (a new source offset): never lost, and never replayed again unless asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import split_key
from services.common.kafka import partitions_behind
from services.common.losses import DeadLetter, LossRepository, Source

log = structlog.get_logger(__name__)


Publish = Callable[[list[tuple[bytes, bytes]]], Awaitable[None]]
"""Sends ``(key, value)`` pairs to the completions topic; returns once the broker acknowledged."""


def producer_publish(producer: Any, topic: str) -> Publish:
    """:data:`Publish` with a started producer (the gateway uses its publisher instead)."""

    async def publish(messages: list[tuple[bytes, bytes]]) -> None:
        futures = [await producer.send(topic, key=k, value=v) for k, v in messages]
        await asyncio.gather(*futures)

    return publish


@dataclass
class ReplayResult:
    examined: int = 0
    """Records read from the dead-letter topic."""
    selected: int = 0
    """Of those, the ones matching the filters (each dead letter once)."""
    already: int = 0
    """Selected but replayed before."""
    replayed: int = 0
    """Re-published now (or, in a dry run, that would be)."""


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode(errors="replace")
    return None


def _integer(text: str | None) -> int | None:
    if text is None or not text.removeprefix("-").isdigit():
        return None
    return int(text)


def source_of(record: Any) -> Source:
    """Where the dead letter came from (its headers), else where it sits in the DLQ topic.

    The source's timestamp is 0 when the headers do not carry one (an earlier worker's dead
    letter), as in the rows recorded for those.
    """
    topic = _header(record, "source_topic")
    partition = _header(record, "source_partition")
    offset = _header(record, "source_offset")
    if topic and partition and offset and partition.isdigit() and offset.isdigit():
        return (
            topic,
            int(partition),
            int(offset),
            _integer(_header(record, "source_timestamp")) or 0,
        )
    return (record.topic, record.partition, record.offset, int(record.timestamp or 0))


def matches(record: Any, project: str | None, reason: str | None) -> bool:
    if project is not None and split_key(record.key)[0] != project:
        return False
    return reason is None or reason.lower() in (_header(record, "reason") or "").lower()


def replayed_record(record: Any, at: datetime) -> DeadLetter:
    project, completion_id = split_key(record.key)
    topic, partition, offset, timestamp = source_of(record)
    return DeadLetter(
        project=project,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        source_timestamp=timestamp,
        completion_id=completion_id,
        message_key=record.key or b"",
        reason=_header(record, "reason") or "",
        dead_at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        payload=record.value or b"",
        replayed_at=at,
    )


async def replay(
    *,
    bootstrap: str,
    publish: Publish,
    losses: LossRepository,
    dead_letter_topic: str,
    project: str | None = None,
    reason: str | None = None,
    dry_run: bool = False,
    chunk: int = 500,
    idle_s: float = 10.0,
) -> ReplayResult:
    """Replay the selected dead letters of ``dead_letter_topic`` not replayed yet."""
    result = ReplayResult()
    seen: set[Source] = set()

    async def handle(records: list[Any]) -> None:
        result.examined += len(records)
        chosen: dict[Source, Any] = {}
        for record in records:
            source = source_of(record)
            if source in seen or not matches(record, project, reason):
                continue  # a message dead-lettered twice (a redelivery) is one dead letter
            seen.add(source)
            chosen[source] = record
        result.selected += len(chosen)
        done = await losses.replayed(list(chosen))
        todo = [record for source, record in chosen.items() if source not in done]
        result.already += len(chosen) - len(todo)
        result.replayed += len(todo)
        if dry_run or not todo:
            return
        await publish([(r.key or b"", r.value or b"") for r in todo])
        now = datetime.now(UTC)
        await losses.record_dead_letters([replayed_record(r, now) for r in todo])

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        await consumer.topics()  # refreshes the metadata
        partitions = sorted(consumer.partitions_for_topic(dead_letter_topic) or ())
        tps = [TopicPartition(dead_letter_topic, p) for p in partitions]
        if not tps:
            log.warning("dead_letter_topic_missing", topic=dead_letter_topic)
            return result
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_progress = time.monotonic()
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=chunk)
            records = [r for tp in tps for r in fetched.get(tp, [])]
            if records:
                last_progress = time.monotonic()
                await handle(records)
            if not await partitions_behind(consumer, tps):
                break
            if time.monotonic() - last_progress > idle_s:
                log.warning("replay_stopped_idle", seconds=idle_s)
                break
    finally:
        await consumer.stop()
    log.info(
        "dead_letters_replayed",
        examined=result.examined,
        selected=result.selected,
        already=result.already,
        replayed=result.replayed,
        project=project,
        reason=reason,
        dry_run=dry_run,
    )
    return result
