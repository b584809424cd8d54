"""Dead letters: headers on the topic, and the record kept per project."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.events import split_key
from services.worker.pipeline.dead import dead_letter_headers, dead_letter_record
from services.worker.pipeline.types import Invalid, Message, Partition, Processed

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(b"projA/chatcmpl-1", ("projA", "chatcmpl-1"), id="project-and-id"),
        pytest.param(b"projA/a/b", ("projA", "a/b"), id="slash-in-id"),
        pytest.param(b"no-slash", ("", "no-slash"), id="no-project"),
        pytest.param(b"", ("", ""), id="empty"),
        pytest.param(None, ("", ""), id="none"),
        pytest.param(b"\xffp/x", ("\ufffdp", "x"), id="not-utf8"),
    ],
)
def test_split_key(key: bytes | None, expected: tuple[str, str]) -> None:
    assert split_key(key) == expected


def test_garbage_value_is_recorded_under_the_project_of_its_key() -> None:
    dead = Processed(
        Message(
            Partition("maniac.completions.v1", 3), 41, b"projA/c-1", b"\xff{not json", 1767225599123
        ),
        Invalid("not JSON: bad"),
    )
    assert dead_letter_headers(dead) == [
        ("reason", b"not JSON: bad"),
        ("source_topic", b"maniac.completions.v1"),
        ("source_partition", b"3"),
        ("source_offset", b"41"),
        ("source_timestamp", b"1767225599123"),
    ]
    record = dead_letter_record(dead, AT)
    assert (record.project, record.completion_id, record.reason) == (
        "projA",
        "c-1",
        "not JSON: bad",
    )
    assert record.source == ("maniac.completions.v1", 3, 41, 1767225599123)
    assert record.payload == b"\xff{not json"
    assert record.message_key == b"projA/c-1"
    assert record.dead_at == AT


def test_message_without_key_or_value() -> None:
    dead = Processed(Message(Partition("t", 0), 0, None, None), Invalid("empty message"))
    record = dead_letter_record(dead, AT)
    assert (record.project, record.completion_id, record.payload) == ("", "", b"")
