"""Dead letters keep their identity across lives of the log, on the real engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

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
