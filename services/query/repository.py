"""All SQL of the query service; every value is a bound parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from services.common.clickhouse import ClickHouse
from services.common.records import normalize_slug

MAX_OFFSET = 2**62  # larger offsets return an empty page rather than overflow UInt64


class CompletionsRepository:
    def __init__(self, clickhouse: ClickHouse) -> None:
        self._ch = clickhouse

    async def list(
        self,
        project: str,
        *,
        limit: int,
        offset: int,
        model: str | None,
        container: str | None,
        order: Literal["asc", "desc"],
    ) -> tuple[list[str], int]:
        """The page of stored responses (JSON text) and the total matching the filters."""
        offset = min(offset, MAX_OFFSET)
        where = ["project = {project:String}"]
        params: dict[str, object] = {"project": project, "limit": limit, "offset": offset}
        if model is not None:
            where.append("model = {model:String}")
            params["model"] = normalize_slug(model)
        if container is not None:
            where.append("container = {container:String}")
            params["container"] = container
        condition = " AND ".join(where)
        direction = "ASC" if order == "asc" else "DESC"
        # The page's ids first (narrow columns only), then their bodies by primary key.
        ids = await self._ch.rows(
            f"SELECT completion_id FROM {{database}}.completions FINAL WHERE {condition} "
            f"ORDER BY created {direction}, completion_id {direction} "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
            params,
        )
        total = await self._ch.rows(
            f"SELECT count() FROM {{database}}.completions FINAL WHERE {condition}", params
        )
        page = [str(row[0]) for row in ids]
        bodies = await self._bodies(project, page)
        return [bodies[i] for i in page if i in bodies], int(total[0][0])

    async def get(self, project: str, completion_id: str) -> str | None:
        return (await self._bodies(project, [completion_id])).get(completion_id)

    async def _bodies(self, project: str, ids: Sequence[str]) -> dict[str, str]:
        """Stored responses by id, from ``completion_bodies`` (small granules)."""
        if not ids:
            return {}
        sql = (
            "SELECT completion_id, response FROM {database}.%s FINAL "
            "WHERE project = {project:String} AND completion_id IN {ids:Array(String)}"
        )
        params = {"project": project, "ids": ids}
        found = {str(r[0]): r[1] for r in await self._ch.rows(sql % "completion_bodies", params)}
        missing = [i for i in ids if i not in found]
        if missing:  # stored by an insert whose view write has not landed yet: rare, still exact
            params["ids"] = missing
            rows = await self._ch.rows(sql % "completions", params)
            found |= {str(r[0]): r[1] for r in rows}
        return found
