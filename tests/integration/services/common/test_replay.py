"""Replaying dead letters on the real broker and engine, with a worker storing what comes back."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.clickhouse import ClickHouse
from services.common.losses import LossRepository
from services.common.replay import producer_publish, replay
from services.common.settings import ServeSettings
from tests.conftest import Broker, eventually
from tests.support.worker import RunningWorker, count, count_is, event


def _headers(settings: ServeSettings, offset: int, reason: str) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.encode()),
        ("source_topic", settings.topic.encode()),
        ("source_partition", b"0"),
        ("source_offset", str(offset).encode()),
    ]


async def _dead_letter(
    producer: Any, settings: ServeSettings, key: bytes, value: bytes, offset: int, reason: str
) -> None:
    """As an older worker would have dead-lettered it (a message valid under today's code)."""
    sent = await producer.send(
        settings.dead_letter_topic, key=key, value=value, headers=_headers(settings, offset, reason)
    )
    await sent


async def test_replay_selects_by_project_and_reason_once_and_still_invalid_comes_back(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    losses = LossRepository(clickhouse)
    fixed_p = event("fixed-p", project="p")
    await _dead_letter(producer, settings, *fixed_p, 1000, "invalid event at item: old bug")
    await _dead_letter(producer, settings, *fixed_p, 1000, "invalid event at item: old bug")
    await _dead_letter(producer, settings, *event("fixed-q", project="q"), 1001, "old bug")
    await _dead_letter(producer, settings, b"p/still-bad", b"{nope", 1002, "not JSON: x")

    async def run(**filters: Any) -> Any:
        return await replay(
            bootstrap=broker.bootstrap,
            publish=producer_publish(producer, settings.topic),
            losses=losses,
            dead_letter_topic=settings.dead_letter_topic,
            **filters,
        )

    dry = await run(project="p", dry_run=True)
    assert (dry.examined, dry.selected, dry.already, dry.replayed) == (4, 2, 0, 2)
    # an earlier worker's dead letters: no source_timestamp header, so 0 in their identity
    earlier = [(settings.topic, 0, 1000, 0), (settings.topic, 0, 1002, 0)]
    assert await losses.replayed(earlier) == set()

    async with RunningWorker(settings, broker, clickhouse):
        first = await run(project="p", reason="OLD BUG")
        assert (first.selected, first.already, first.replayed) == (1, 0, 1)
        await eventually(lambda: count_is(clickhouse, 1))
        stored = await clickhouse.rows("SELECT project, completion_id FROM {database}.completions")
        assert [tuple(r) for r in stored] == [("p", "fixed-p")]

        again = await run(project="p", reason="old bug")
        assert (again.selected, again.already, again.replayed) == (1, 1, 0)

        # without the reason filter the still-invalid one goes too, and is dead-lettered again
        rest = await run(project="p")
        assert (rest.selected, rest.already, rest.replayed) == (2, 1, 1)

        async def dead_again() -> bool:
            rows = await losses.list_dead_letters("p", 10)
            return sum(1 for r in rows if r["completion_id"] == "still-bad") == 2

        await eventually(dead_again)
        await asyncio.sleep(0.5)
        assert await count(clickhouse) == 1

    listed = {(r["completion_id"], r["source"]): r for r in await losses.list_dead_letters("p", 10)}
    assert listed[("fixed-p", f"{settings.topic}/0/1000")]["replayed_at"] is not None
    assert listed[("still-bad", f"{settings.topic}/0/1002")]["replayed_at"] is not None
    new = [r for (cid, src), r in listed.items() if cid == "still-bad" and not src.endswith("1002")]
    assert new[0]["replayed_at"] is None
    assert new[0]["reason"].startswith("not JSON")
    # project q was never selected: nothing of it replayed or recorded
    assert await losses.list_dead_letters("q", 10) == []
