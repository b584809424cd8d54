"""Dead letters keep their identity across lives of the log, on the real engine."""

from __future__ import annotations

import os
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.common.clickhouse import ClickHouse
from services.common.losses import DeadLetter, LossRepository
from tests.support.migrations import apply_migrations, database_before

AT = datetime(2026, 11, 26, 1, 2, 3, tzinfo=UTC)
LATER = datetime(2026, 11, 26, 2, 0, 0, tzinfo=UTC)


def _dead(offset: int, timestamp: int, payload: bytes) -> DeadLetter:
    return DeadLetter(
        project="p",
        source_topic="maniac.completions.v1",
        source_partition=0,
        source_offset=offset,
        source_timestamp=timestamp,
        completion_id=payload.decode(),
        message_key=b"p/" + payload,
        reason="not JSON: x",
        dead_at=AT,
        payload=payload,
    )


async def test_two_dead_letters_at_one_offset_of_two_lives_of_the_log_are_two(
    clickhouse: ClickHouse,
) -> None:
    """The embedded broker on memory storage numbers from 0 again when it starts: a new dead
    letter at an offset an earlier one had is another dead letter, not that one again."""
    losses = LossRepository(clickhouse)
    earlier = _dead(7, 1_764_118_923_000, b"earlier")
    await losses.record_dead_letters([earlier])
    await losses.record_dead_letters([replace(earlier, replayed_at=LATER)])
    later = _dead(7, 1_764_122_523_000, b"later")
    await losses.record_dead_letters([later, later])  # and written twice: a redelivery

    assert await losses.replayed([earlier.source, later.source]) == {earlier.source}
    listed = await losses.list_dead_letters("p", 10)
    assert sorted((d["completion_id"], d["replayed_at"] is not None) for d in listed) == [
        ("earlier", True),
        ("later", False),
    ]
    dead = (await losses.status("p"))["dead_lettered"]
    assert (dead["total"], dead["replayed"]) == (2, 1)


async def test_dead_letters_stored_before_0012_keep_matching_their_records(
    clickhouse: ClickHouse,
) -> None:
    async with database_before(clickhouse, 12) as before:
        await before.command(
            "INSERT INTO {database}.dead_letters (project, source_topic, source_partition, "
            "source_offset, completion_id, message_key, reason, dead_at, replayed_at, payload) "
            "VALUES ('p', 'maniac.completions.v1', 0, 41, 'old', 'p/old', 'r', "
            "'2026-11-25 00:00:00', '2026-11-25 01:00:00', 'x')"
        )
        await apply_migrations(before, 12, 12)

        losses = LossRepository(before)
        # its record in the dead-letter topic carries no source_timestamp header: 0
        old = ("maniac.completions.v1", 0, 41, 0)
        assert await losses.replayed([old, ("maniac.completions.v1", 0, 41, 5)]) == {old}
        await losses.record_dead_letters([_dead(41, 1_764_118_923_000, b"new")])
        listed = await losses.list_dead_letters("p", 10)
        assert sorted(d["completion_id"] for d in listed) == ["new", "old"]


async def test_unreplayed_dead_letters_are_read_in_pages_bounded_in_rows_and_bytes(
    clickhouse: ClickHouse,
) -> None:
    losses = LossRepository(clickhouse)
    big = [
        replace(_dead(offset, 1, b"b%d" % offset), payload=os.urandom(2**20 + 1))
        for offset in range(24)
    ]
    # a dead letter with the same time, partition and offset as another: ordered by identity
    small = [_dead(100 + n, 1, b"s%d" % n) for n in range(5)] + [_dead(100, 2, b"twin")]
    later = [
        replace(_dead(200, 1, b"l%d" % n), dead_at=LATER, source_offset=200 + n) for n in range(3)
    ]
    replayed = _dead(300, 1, b"replayed")
    await losses.record_dead_letters(big + small + later + [replayed])
    await losses.record_dead_letters([replace(replayed, replayed_at=LATER)])

    sizes = [len(d.payload) for d in big]
    tracemalloc.start()
    try:
        pages = [
            [(d.source, len(d.payload)) for d in page]
            async for page in losses.unreplayed_dead_letters(max_rows=4, max_bytes=2 * 2**20)
        ]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # what one page holds (a letter of 1 MB, read as hex), not all 24 MB of them
    assert peak < 12 * 2**20

    expected = sorted(big + small, key=lambda d: (d.source, d.project)) + later
    assert [source for page in pages for source, _ in page] == [d.source for d in expected]
    # 2 MB: one letter of more than 1 MB, with the small ones after it; 4 rows at most
    assert [len(page) for page in pages] == [1] * 23 + [4, 4, 2]
    assert [size for page in pages for _, size in page][:24] == sizes


@pytest.mark.parametrize("max_rows", [1, 2, 3, 7, 100])
async def test_pages_of_dead_letters_follow_on_across_every_column_of_the_key(
    clickhouse: ClickHouse, max_rows: int
) -> None:
    losses = LossRepository(clickhouse)
    letters = [
        replace(
            _dead(offset, timestamp, f"{project}{topic}{partition}{offset}{timestamp}".encode()),
            project=project,
            source_topic=topic,
            source_partition=partition,
        )
        for project in ("a", "b")
        for topic in ("t1", "t2")
        for partition in (0, 1)
        for offset in (0, 9)
        for timestamp in (-1, 5)
    ]
    await losses.record_dead_letters(letters[::-1])

    pages = [page async for page in losses.unreplayed_dead_letters(max_rows=max_rows)]
    assert all(len(page) <= max_rows for page in pages)
    read = [(d.project, *d.source) for page in pages for d in page]
    assert read == sorted((d.project, *d.source) for d in letters)  # each once, in key order
