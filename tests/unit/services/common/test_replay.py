"""Which dead letters a replay selects, and how it names them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.common.replay import matches, source_of


@dataclass
class Record:
    key: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "dlq"
    partition: int = 1
    offset: int = 9
    timestamp: int = 1_767_225_600_000


HEADERS = [
    ("reason", b"invalid event at output.created: bad"),
    ("source_topic", b"maniac.completions.v1"),
    ("source_partition", b"3"),
    ("source_offset", b"41"),
]


def test_a_dead_letter_is_named_by_its_source_record() -> None:
    stamped = [*HEADERS, ("source_timestamp", b"1767225599123")]
    assert source_of(Record(b"p/x", stamped)) == ("maniac.completions.v1", 3, 41, 1767225599123)


def test_an_earlier_workers_dead_letter_has_no_source_timestamp() -> None:
    assert source_of(Record(b"p/x", HEADERS)) == ("maniac.completions.v1", 3, 41, 0)
    garbled = [*HEADERS, ("source_timestamp", b"soon")]
    assert source_of(Record(b"p/x", garbled)) == ("maniac.completions.v1", 3, 41, 0)


def test_without_source_headers_it_is_named_by_its_place_in_the_dead_letter_topic() -> None:
    record = Record(b"p/x", [("source_offset", b"nope")])
    assert source_of(record) == ("dlq", 1, 9, 1_767_225_600_000)


@pytest.mark.parametrize(
    ("project", "reason", "selected"),
    [
        pytest.param(None, None, True, id="everything"),
        pytest.param("p", None, True, id="its-project"),
        pytest.param("q", None, False, id="another-project"),
        pytest.param("p", "OUTPUT.CREATED", True, id="reason-any-case"),
        pytest.param(None, "not JSON", False, id="another-reason"),
    ],
)
def test_selection(project: str | None, reason: str | None, selected: bool) -> None:
    assert matches(Record(b"p/x", HEADERS), project, reason) is selected


def test_a_record_without_key_matches_no_project() -> None:
    assert not matches(Record(None, HEADERS), "p", None)
    assert matches(Record(None, HEADERS), None, "created")
