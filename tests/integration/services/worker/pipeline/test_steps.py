"""The write step against the real ClickHouse engine: what it refuses, and what it does not."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from schemas import COMPLETIONS_INSERT_COLUMNS
from services.common.clickhouse import ClickHouse
from services.worker.pipeline import process
from services.worker.pipeline.steps import CommitOffsets, Retrying, WriteBatch
from services.worker.pipeline.types import Batch, Invalid, Message, Partition, Processed, Row
from services.worker.runner import insert_rows
from tests.support.worker import count

P0 = Partition("t", 0)


class Sinks:
    def __init__(self) -> None:
        self.dead: list[Processed] = []
        self.recorded: list[Processed] = []
        self.committed: list[dict[Partition, int]] = []

    async def dead_letter(self, dead: list[Processed]) -> None:
        self.dead += dead

    async def record_dead(self, dead: list[Processed]) -> None:
        self.recorded += dead

    async def commit(self, offsets: dict[Partition, int]) -> None:
        self.committed.append(dict(offsets))


def _write_step(clickhouse: ClickHouse, sinks: Sinks, stopping: asyncio.Event) -> WriteBatch:
    async def insert(body: bytes) -> None:
        await insert_rows(clickhouse, body)

    retrying = Retrying(0.01, 0.05, stopping)
    commit = CommitOffsets(sinks.commit, retrying)
    return WriteBatch(insert, sinks.dead_letter, sinks.record_dead, retrying, next_step=commit)


def _batch(rows: list[tuple[Message, Row]]) -> Batch:
    batch = Batch()
    for message, row in rows:
        batch.rows.append(row)
        batch.sources[(row.project, row.completion_id)] = message
        batch.offsets[message.partition] = message.offset + 1
    return batch


def _good(offset: int) -> tuple[Message, Row]:
    value = (
        b'{"v":1,"kind":"register","project":"p","container":"c","completion_id":"ok-%d",'
        b'"received_at_ms":1700000000000,"item":{"input":{"messages":[]}}}' % offset
    )
    row = process(value)
    assert isinstance(row, Row)
    return Message(P0, offset, b"p/ok", value), row


@pytest.mark.parametrize(
    ("column", "value", "code"),
    [
        pytest.param("created", '"not a time"', "Code: 41", id="datetime"),
        pytest.param("prompt_tokens", "-5", "Code: 72", id="negative-count"),
        pytest.param("spend", "1e40", "Code: 69", id="decimal-overflow"),
    ],
)
async def test_a_row_clickhouse_refuses_is_dead_lettered_and_the_rest_stored(
    clickhouse: ClickHouse, column: str, value: str, code: str
) -> None:
    sinks = Sinks()
    values = orjson.loads(_good(2)[1].json)
    values[COMPLETIONS_INSERT_COLUMNS.index("completion_id")] = "bad"
    values[COMPLETIONS_INSERT_COLUMNS.index(column)] = orjson.Fragment(value)
    bad = (Message(P0, 2, b"p/bad", b"{}"), Row(orjson.dumps(values), "p", "bad"))
    rows = [_good(0), _good(1), bad, _good(3)]
    await _write_step(clickhouse, sinks, asyncio.Event()).submit(_batch(rows))

    assert await count(clickhouse) == 3
    assert [d.message.offset for d in sinks.dead] == [2]
    reason = sinks.dead[0].result
    assert isinstance(reason, Invalid)
    assert reason.reason.startswith(f"rejected by ClickHouse: {code}.")
    assert sinks.recorded == sinks.dead
    assert sinks.committed == [{P0: 4}]


async def test_clickhouse_unavailable_is_retried_not_dead_lettered(clickhouse: ClickHouse) -> None:
    await clickhouse.command("RENAME TABLE {database}.completions TO {database}.away")
    sinks = Sinks()
    stopping = asyncio.Event()
    write = asyncio.create_task(
        _write_step(clickhouse, sinks, stopping).submit(_batch([_good(0), _good(1)]))
    )
    await asyncio.sleep(0.5)
    assert not write.done()  # still retrying: a missing table is not the rows' fault
    await clickhouse.command("RENAME TABLE {database}.away TO {database}.completions")
    await asyncio.wait_for(write, timeout=10)
    assert await count(clickhouse) == 2
    assert sinks.dead == []
    assert sinks.committed == [{P0: 2}]
