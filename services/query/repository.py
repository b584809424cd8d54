"""All SQL of the query service; every value is a bound parameter."""

from __future__ import annotations

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
        page = await self._ch.rows(
            f"SELECT response FROM {{database}}.completions FINAL WHERE {condition} "
            f"ORDER BY created {direction}, completion_id {direction} "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
            params,
        )
        total = await self._ch.rows(
            f"SELECT count() FROM {{database}}.completions FINAL WHERE {condition}", params
        )
        return [row[0] for row in page], int(total[0][0])

    async def get(self, project: str, completion_id: str) -> str | None:
        rows = await self._ch.rows(
            "SELECT response FROM {database}.completions FINAL "
            "WHERE project = {project:String} AND completion_id = {id:String} LIMIT 1",
            {"project": project, "id": completion_id},
        )
        return rows[0][0] if rows else None
