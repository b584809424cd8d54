"""List and get over real rows, stored by the worker's own pipeline."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Literal

import orjson
import pytest

from schemas.events import encode_event
from services.common.clickhouse import ClickHouse
from services.query.repository import CompletionsRepository
from services.worker.pipeline import process
from services.worker.pipeline.types import Row
from services.worker.runner import insert_rows
from tests.support.migrations import apply_migrations, database_before
from tests.support.worker import store


def _event(r: dict[str, Any]) -> bytes:
    item = {
        "input": {"messages": []},
        "output": {"choices": [], "created": r["created"], "model": r.get("model", "m1")},
    }
    return encode_event(
        kind="register",
        project=r.get("project", "p"),
        container=r.get("container", "c1"),
        completion_id=r["id"],
        received_at_ms=r.get("received_at_ms", 1_000),
        item=item,
    )


def _row(value: bytes) -> bytes:
    """The row the worker's transform makes of an event, to insert past its deduplication."""
    row = process(value)
    assert isinstance(row, Row)
    return row.json + b"\n"


async def _store(ch: ClickHouse, *records: dict[str, Any]) -> None:
    """Through the worker's own steps: a version stored again is dropped, a newer one is
    written with a retraction of the stored one (what the list relies on)."""
    await store(ch, [_event(r) for r in records])


def _ids(page: list[str]) -> list[str]:
    return [orjson.loads(p)["id"] for p in page]


@pytest.fixture
def repo(clickhouse: ClickHouse) -> CompletionsRepository:
    return CompletionsRepository(clickhouse)


async def test_list_orders_by_created_with_stable_tie_break(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await _store(
        clickhouse,
        {"id": "a", "created": 100},
        {"id": "c", "created": 300},
        {"id": "b2", "created": 200},
        {"id": "b1", "created": 200},
    )
    desc, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert _ids(desc) == ["c", "b2", "b1", "a"]
    assert total == 4
    asc, _ = await repo.list("p", limit=20, offset=0, model=None, container=None, order="asc")
    assert _ids(asc) == ["a", "b1", "b2", "c"]


async def test_pagination_and_total(clickhouse: ClickHouse, repo: CompletionsRepository) -> None:
    await _store(clickhouse, *({"id": f"id-{i:02d}", "created": 1000 + i} for i in range(25)))
    pages = []
    for offset in (0, 10, 20, 30):
        page, total = await repo.list(
            "p", limit=10, offset=offset, model=None, container=None, order="asc"
        )
        assert total == 25
        pages.append(_ids(page))
    assert [len(p) for p in pages] == [10, 10, 5, 0]
    assert sum(pages, []) == [f"id-{i:02d}" for i in range(25)]


async def test_filters_by_model_and_container(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await _store(
        clickhouse,
        {"id": "1", "created": 1, "model": "openai/gpt-4o", "container": "x"},
        {"id": "2", "created": 2, "model": "openai:gpt-4o", "container": "y"},
        {"id": "3", "created": 3, "model": "other", "container": "x"},
    )

    async def ids(model: str | None, container: str | None) -> tuple[list[str], int]:
        page, total = await repo.list(
            "p", limit=20, offset=0, model=model, container=container, order="asc"
        )
        return _ids(page), total

    assert await ids("openai/gpt-4o", None) == (["1", "2"], 2)
    assert await ids("openai:gpt-4o", None) == (["1", "2"], 2)
    assert await ids(None, "x") == (["1", "3"], 2)
    assert await ids("openai/gpt-4o", "x") == (["1"], 1)
    assert await ids("nope", None) == ([], 0)


async def test_projects_never_see_each_other(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await _store(
        clickhouse, {"id": "mine", "created": 1}, {"id": "theirs", "created": 2, "project": "q"}
    )
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert (_ids(page), total) == (["mine"], 1)
    assert await repo.get("p", "theirs") is None
    assert await repo.get("q", "theirs") is not None


async def test_same_id_twice_is_one_completion_newest_wins(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await _store(clickhouse, {"id": "dup", "created": 1, "model": "old", "received_at_ms": 1})
    await _store(clickhouse, {"id": "dup", "created": 2, "model": "new", "received_at_ms": 2})
    await _store(clickhouse, {"id": "dup", "created": 2, "model": "new", "received_at_ms": 2})
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert total == 1
    assert [orjson.loads(p)["model"] for p in page] == ["new"]
    found = await repo.get("p", "dup")
    assert found is not None
    assert orjson.loads(found)["model"] == "new"


@pytest.mark.parametrize(
    "hostile",
    ["' OR 1=1 --", "p'; DROP TABLE completions; --", "\\'", "{project:String}", "%s"],
)
async def test_filters_are_parameters_not_sql(
    clickhouse: ClickHouse, repo: CompletionsRepository, hostile: str
) -> None:
    await _store(clickhouse, {"id": "x", "created": 1})
    page, total = await repo.list(
        "p", limit=20, offset=0, model=hostile, container=hostile, order="desc"
    )
    assert (page, total) == ([], 0)
    assert await repo.get(hostile, hostile) is None
    page, total = await repo.list(
        hostile, limit=20, offset=0, model=None, container=None, order="desc"
    )
    assert (page, total) == ([], 0)
    assert (await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc"))[
        1
    ] == 1


async def test_bodies_are_read_from_their_table_and_the_newest_version_wins(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await clickhouse.command("SYSTEM STOP MERGES {database}.completion_responses")
    await _store(clickhouse, {"id": "x", "created": 100, "model": "old"})
    await _store(clickhouse, {"id": "x", "created": 100, "model": "new", "received_at_ms": 2_000})
    await _store(clickhouse, {"id": "x", "created": 100, "model": "mid", "received_at_ms": 1_500})
    bodies = await clickhouse.rows(
        "SELECT count() FROM {database}.completion_responses WHERE completion_id = 'x'"
    )
    assert bodies[0][0] == 2  # both versions stored are there, unmerged; the newest is read
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert [orjson.loads(p)["model"] for p in page] == ["new"]
    assert total == 1
    got = await repo.get("p", "x")
    assert got is not None
    assert orjson.loads(got)["model"] == "new"


async def test_a_response_that_lands_after_its_listing_is_waited_for(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    """The listing and the responses are written by two views of one insert (0011): a page
    read between them names a completion whose response comes a moment later."""
    await _store(clickhouse, {"id": "a", "created": 100}, {"id": "b", "created": 200})
    select = "SELECT * FROM {database}.completion_responses WHERE completion_id = "
    saved_a = await clickhouse.json_each_row(select + "'a'")
    saved_b = await clickhouse.json_each_row(select + "'b'")
    await clickhouse.command("TRUNCATE TABLE {database}.completion_responses")
    await clickhouse.insert_json_each_row("completion_responses", saved_a)

    writer = clickhouse.another_connection()  # a client runs one call at a time

    async def lands_later() -> None:
        await asyncio.sleep(0.03)
        await writer.insert_json_each_row("completion_responses", saved_b)

    landing = asyncio.create_task(lands_later())
    try:
        page, total = await repo.list(
            "p", limit=20, offset=0, model=None, container=None, order="desc"
        )
    finally:
        await landing
        writer.close()
    assert (_ids(page), total) == (["b", "a"], 2)

    await clickhouse.command(
        "DELETE FROM {database}.completion_responses WHERE completion_id = 'b'"
    )
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert (_ids(page), total) == (["a"], 2)  # never landed: the page says what it has
    assert await repo.get("p", "b") is None
    assert await repo.get("p", "missing") is None


# -- the list against the FINAL read it replaced ---------------------------------------------

MODELS = ["m1", "m2", "openai/gpt-4o"]
CONTAINERS = ["c1", "c2", "c3"]
Order = Literal["asc", "desc"]


async def _truth(
    ch: ClickHouse,
    project: str,
    *,
    limit: int,
    offset: int,
    model: str | None,
    container: str | None,
    order: Order,
) -> tuple[list[str], int]:
    """The list as it was read before ``completion_listing``: ``completions FINAL``, sorted,
    with each one's response from ``completion_responses FINAL`` (the responses, as the list
    returns them, and the total)."""
    where = ["project = {project:String}"]
    params: dict[str, object] = {"project": project, "limit": limit, "offset": offset}
    if model is not None:
        where.append("model = {model:String}")
        params["model"] = model
    if container is not None:
        where.append("container = {container:String}")
        params["container"] = container
    condition = " AND ".join(where)
    direction = order.upper()
    page = await ch.rows(
        f"SELECT completion_id FROM {{database}}.completions FINAL WHERE {condition} "
        f"ORDER BY created {direction}, completion_id {direction} "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        params,
    )
    ids = [str(r[0]) for r in page]
    responses = await ch.rows(
        "SELECT completion_id, response FROM {database}.completion_responses FINAL "
        "WHERE project = {project:String} AND completion_id IN {ids:Array(String)}",
        {"project": project, "ids": ids},
    )
    by_id = {str(r[0]): str(r[1]) for r in responses}
    total = await ch.rows(
        f"SELECT count() FROM {{database}}.completions FINAL WHERE {condition}", params
    )
    return [by_id[i] for i in ids], int(total[0][0])


async def _same_as_truth(
    ch: ClickHouse, repo: CompletionsRepository, rng: random.Random, project: str = "p"
) -> None:
    """Compare every filter and both orders, at offsets from 0 to beyond the end."""
    for model, container in [
        (None, None),
        (rng.choice(MODELS), None),
        (None, rng.choice(CONTAINERS)),
        (rng.choice(MODELS), rng.choice(CONTAINERS)),
    ]:
        for order in ("asc", "desc"):
            _, matching = await _truth(
                ch, project, limit=1, offset=0, model=model, container=container, order=order
            )
            for offset in (0, rng.randrange(matching + 1), max(matching - 3, 0), matching + 2):
                args: dict[str, Any] = {
                    "limit": rng.choice([1, 5, 20]),
                    "offset": offset,
                    "model": model,
                    "container": container,
                    "order": order,
                }
                page, total = await repo.list(project, **args)
                assert (page, total) == await _truth(ch, project, **args), args
                assert len(set(_ids(page))) == len(page)


class _History:
    """Random registrations, as clients could send them: new completions, newer versions that
    move created, model or container (or change nothing the list shows), re-deliveries of the
    stored version, versions older than the stored one, several versions in one batch."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.clock = 1_000
        self.created = 0
        self.stored: dict[tuple[str, str], dict[str, Any]] = {}

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _value(self, field: str) -> Any:
        if field == "created":  # few distinct seconds: many ties, the id decides
            return 1_750_000_000 + self.rng.randrange(12)
        return self.rng.choice(MODELS if field == "model" else CONTAINERS)

    def batch(self) -> list[dict[str, Any]]:
        rng, records = self.rng, []
        for _ in range(rng.randrange(1, 30)):
            roll = rng.random()
            if roll < 0.35 or not self.stored:
                self.created += 1
                record = {
                    "id": f"id-{self.created:03d}",
                    "project": "p" if rng.random() < 0.9 else "q",
                    "received_at_ms": self._tick(),
                    **{f: self._value(f) for f in ("created", "model", "container")},
                }
            else:
                old = self.stored[rng.choice(sorted(self.stored))]
                if roll < 0.75:  # a newer version
                    record = {**old, "received_at_ms": self._tick()}
                    moved = rng.choice(["created", "model", "container", "nothing"])
                    if moved != "nothing":
                        record[moved] = self._value(moved)
                elif roll < 0.9:  # the stored version again: a re-delivery
                    record = dict(old)
                else:  # an older version, arriving late: dropped
                    record = {**old, "model": self._value("model"), "received_at_ms": 1}
            records.append(record)
            key = (record["project"], record["id"])
            if (
                key not in self.stored
                or record["received_at_ms"] > self.stored[key]["received_at_ms"]
            ):
                self.stored[key] = record
        return records


@pytest.mark.parametrize("merges", ["stopped", "optimized"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_list_equals_the_final_read_over_random_histories(
    clickhouse: ClickHouse, repo: CompletionsRepository, seed: int, merges: str
) -> None:
    rng = random.Random(seed)
    history = _History(rng)
    if merges == "stopped":  # retractions stay beside the versions they cancel
        await clickhouse.command("SYSTEM STOP MERGES {database}.completion_listing")
        await clickhouse.command("SYSTEM STOP MERGES {database}.completion_responses")
    for round_ in range(8):
        await _store(clickhouse, *history.batch())
        if merges == "optimized" and round_ % 3 == 2:
            await clickhouse.command("OPTIMIZE TABLE {database}.completion_listing FINAL")
            await clickhouse.command("OPTIMIZE TABLE {database}.completion_responses FINAL")
        await _same_as_truth(clickhouse, repo, rng)
    await _same_as_truth(clickhouse, repo, rng, project="q")


async def test_retractions_not_merged_away_do_not_shorten_a_page(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await clickhouse.command("SYSTEM STOP MERGES {database}.completion_listing")
    first = [{"id": f"id-{i:03d}", "created": 1_000 + i, "received_at_ms": 1} for i in range(100)]
    await _store(clickhouse, *first)
    for version in range(2, 5):  # three newer versions each, moving between two models
        model = "m1" if version % 2 else "m2"
        await _store(clickhouse, *({**r, "model": model, "received_at_ms": version} for r in first))
    # 7 rows per completion (4 versions, 3 retractions), so the first rows read for a page of
    # 20 (20 + 64) hold only 12 completions
    short = await clickhouse.rows(
        "SELECT count() FROM (SELECT created, completion_id FROM (SELECT created, completion_id, "
        "sign FROM {database}.completion_listing ORDER BY created, completion_id LIMIT 84) "
        "GROUP BY created, completion_id HAVING sum(sign) > 0)"
    )
    assert short[0][0] == 12
    for order in ("asc", "desc"):
        for offset in (0, 50, 90, 99, 100):
            args: dict[str, Any] = {
                "limit": 20,
                "offset": offset,
                "model": None,
                "container": None,
                "order": order,
            }
            page, total = await repo.list("p", **args)
            assert (page, total) == await _truth(clickhouse, "p", **args)
            assert len(page) == min(20, 100 - offset)


async def test_a_window_that_ends_inside_a_completion_s_rows_never_trusts_their_sum(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    """The first rows read for a page can end inside the rows of one (created, completion_id):
    what they add up to there is not that place's sum. Which of its rows come first is the
    engine's choice (equal keys from two parts), so both orders are written here, one per
    project: in one of them the cut shows a version without its retraction."""
    await clickhouse.command("SYSTEM STOP MERGES {database}.completion_listing")
    cuts = {}
    for project, signs in (("p", (1, -1)), ("q", (-1, 1))):
        await _store(
            clickhouse,
            *({"id": f"id-{i:03d}", "created": 5_000 + i, "project": project} for i in range(100)),
        )
        for sign in signs:  # the old places of 40 of them, each a version and its retraction
            await clickhouse.command(
                "INSERT INTO {database}.completion_listing SELECT {project:String}, "
                "toDateTime64(1000 + number, 3, 'UTC'), "
                "concat('id-', leftPad(toString(number), 3, '0')), 'm1', 'c1', {sign:Int8} "
                "FROM numbers(40)",
                {"project": project, "sign": sign},
            )
        await clickhouse.command(
            "INSERT INTO {database}.completion_counts VALUES ({project:String}, 'm1', 'c1', 0, 80)",
            {"project": project},
        )
        # a page of 1 reads 65 rows first: 32 old places whole, and one row of the 33rd
        cut = await clickhouse.rows(
            "SELECT completion_id FROM (SELECT created, completion_id, sign FROM "
            "{database}.completion_listing WHERE project = {project:String} "
            "ORDER BY created, completion_id LIMIT 65) "
            "GROUP BY created, completion_id HAVING sum(sign) > 0",
            {"project": project},
        )
        cuts[project] = [str(r[0]) for r in cut]
    assert sorted(cuts.values()) == [[], ["id-032"]]
    for project in ("p", "q"):
        for offset in (0, 1, 50, 99):
            page, total = await repo.list(
                project, limit=1, offset=offset, model=None, container=None, order="asc"
            )
            assert (_ids(page), total) == ([f"id-{offset:03d}"], 100)


async def test_list_is_exact_over_what_was_stored_before_migration_0008(
    clickhouse: ClickHouse,
) -> None:
    async with database_before(clickhouse, 8) as before:
        history = _History(random.Random(7))
        # the worker of that time wrote into `completions` itself, response included
        await before.command(
            "CREATE TABLE {database}.completions_in AS {database}.completions ENGINE = Null"
        )
        await before.command(
            "CREATE MATERIALIZED VIEW {database}.then_written TO {database}.completions "
            "AS SELECT * FROM {database}.completions_in"
        )
        for _ in range(5):
            await _store(before, *history.batch())
        await before.command("DROP VIEW {database}.then_written")
        await before.command("DROP TABLE {database}.completions_in")
        # as stored before the worker deduplicated: the same version twice, no retraction
        await insert_rows(
            before,
            _row(_event({"id": "legacy", "created": 5, "received_at_ms": 9})) * 2
            + _row(_event({"id": "legacy", "created": 6, "received_at_ms": 10})),
            table="completions",
        )
        await apply_migrations(before, 8)
        repo = CompletionsRepository(before)
        await _same_as_truth(before, repo, random.Random(8))
        for _ in range(3):  # and the views keep it exact from there
            legacy = {"id": "legacy", "created": 7, "received_at_ms": 11}
            await _store(before, *history.batch(), legacy)
            await _same_as_truth(before, repo, random.Random(9))


async def test_totals_are_exact_over_what_was_stored_before_migration_0013(
    clickhouse: ClickHouse,
) -> None:
    """0013 fills ``completion_counts`` from the listing as it stands, retractions not merged
    away included, and its view keeps the totals exact from there."""
    async with database_before(clickhouse, 13) as before:
        await before.command("SYSTEM STOP MERGES {database}.completion_listing")
        history = _History(random.Random(13))
        for _ in range(6):
            await _store(before, *history.batch())
        await apply_migrations(before, 13)
        listed = await before.rows(
            "SELECT project, model, container, sum(sign), count() "
            "FROM {database}.completion_listing GROUP BY project, model, container "
            "ORDER BY project, model, container"
        )
        assert any(rows > net for *_, net, rows in listed)  # retractions not merged away
        counted = await before.rows(
            "SELECT project, model, container, sum(completions), sum(rows) "
            "FROM {database}.completion_counts GROUP BY project, model, container "
            "ORDER BY project, model, container"
        )
        assert counted == listed
        repo = CompletionsRepository(before)
        await _same_as_truth(before, repo, random.Random(14))
        for _ in range(3):
            await _store(before, *history.batch())
            await _same_as_truth(before, repo, random.Random(15))
            await _same_as_truth(before, repo, random.Random(16), project="q")
