"""List and get over real rows, produced by the worker's own transform."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.events import encode_event
from services.common.clickhouse import ClickHouse
from services.query.repository import CompletionsRepository
from services.worker.pipeline import process
from services.worker.pipeline.types import Row


async def _store(ch: ClickHouse, *records: dict[str, Any]) -> None:
    lines = []
    for r in records:
        item = {
            "input": {"messages": []},
            "output": {"choices": [], "created": r["created"], "model": r.get("model", "m1")},
        }
        result = process(
            encode_event(
                kind="register",
                project=r.get("project", "p"),
                container=r.get("container", "c1"),
                completion_id=r["id"],
                received_at_ms=r.get("received_at_ms", 1_000),
                item=item,
            )
        )
        assert isinstance(result, Row)
        lines.append(result.json)
    await ch.insert_json_each_row("completions", b"\n".join(lines))


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
    await _store(clickhouse, {"id": "x", "created": 100, "model": "old"})
    await _store(clickhouse, {"id": "x", "created": 100, "model": "new", "received_at_ms": 2_000})
    bodies = await clickhouse.rows(
        "SELECT count() FROM {database}.completion_bodies WHERE completion_id = 'x'"
    )
    assert bodies[0][0] == 2  # both versions written by the view; FINAL keeps the newest
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert [orjson.loads(p)["model"] for p in page] == ["new"]
    assert total == 1
    got = await repo.get("p", "x")
    assert got is not None
    assert orjson.loads(got)["model"] == "new"


async def test_a_body_missing_from_its_table_is_read_from_completions(
    clickhouse: ClickHouse, repo: CompletionsRepository
) -> None:
    await _store(clickhouse, {"id": "a", "created": 100}, {"id": "b", "created": 200})
    await clickhouse.command("TRUNCATE TABLE {database}.completion_bodies")
    page, total = await repo.list("p", limit=20, offset=0, model=None, container=None, order="desc")
    assert _ids(page) == ["b", "a"]
    assert total == 2
    assert await repo.get("p", "a") is not None
    assert await repo.get("p", "missing") is None
