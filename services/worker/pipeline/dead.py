"""Pure: a message that can never be stored -> its dead-letter headers and its loss record."""

from __future__ import annotations

from datetime import datetime

from schemas.events import split_key
from services.common.losses import DeadLetter
from services.worker.pipeline.types import Invalid, Processed


def reason_of(dead: Processed) -> str:
    return dead.result.reason if isinstance(dead.result, Invalid) else "invalid"


def dead_letter_headers(dead: Processed) -> list[tuple[str, bytes]]:
    """The headers of the dead-letter topic's record: why, and where the message came from."""
    return letter_headers(dead_letter_record(dead, datetime.min))


def letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The dead-letter topic's headers of a dead letter kept in ClickHouse (its identity)."""
    return [
        ("reason", letter.reason.encode()),
        ("source_topic", letter.source_topic.encode()),
        ("source_partition", str(letter.source_partition).encode()),
        ("source_offset", str(letter.source_offset).encode()),
        ("source_timestamp", str(letter.source_timestamp).encode()),
    ]


def dead_letter_record(dead: Processed, dead_at: datetime) -> DeadLetter:
    """The row kept in ClickHouse; the project and completion id come from the key."""
    project, completion_id = split_key(dead.message.key)
    return DeadLetter(
        project=project,
        source_topic=dead.message.partition.topic,
        source_partition=dead.message.partition.partition,
        source_offset=dead.message.offset,
        source_timestamp=dead.message.timestamp_ms,
        completion_id=completion_id,
        message_key=dead.message.key or b"",
        reason=reason_of(dead),
        dead_at=dead_at,
        payload=dead.message.value or b"",
    )
