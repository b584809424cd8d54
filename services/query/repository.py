"""All SQL of the query service; every value is a bound parameter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from services.common.bodies import stored_responses
from services.common.clickhouse import ClickHouse
from services.common.records import normalize_slug

MAX_OFFSET = 2**62  # larger offsets return an empty page rather than overflow UInt64
# Rows read beyond offset + limit on the first try: room for retractions not yet merged away.
_SLACK = 64
# A page's ids whose responses are not stored yet are read again this often, this far apart.
_BODY_RETRIES = 5
_BODY_RETRY_S = 0.02


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
        """The page of stored responses (JSON text) and the total matching the filters.

        The total is read from ``completion_counts`` (migration 0013), the page from
        ``completion_listing`` (0008): rows in page order, +1 for a stored version and -1 for
        its retraction, so the completions that match are the ``(created, completion_id)``
        whose signs sum to 1.
        """
        offset = min(offset, MAX_OFFSET)
        where = ["project = {project:String}"]
        params: dict[str, object] = {"project": project, "offset": offset}
        if model is not None:
            where.append("model = {model:String}")
            params["model"] = normalize_slug(model)
        if container is not None:
            where.append("container = {container:String}")
            params["container"] = container
        condition = " AND ".join(where)
        counted = await self._ch.rows(
            "SELECT sum(completions), sum(rows) FROM {database}.completion_counts "
            f"WHERE {condition}",
            params,
        )
        total, stored_rows = max(int(counted[0][0]), 0), int(counted[0][1])
        expected = max(min(limit, total - offset), 0)  # the page's length, known from the total
        if not expected:
            return [], total
        page = await self._page(
            condition, params, order, limit, offset + limit, expected, stored_rows
        )
        bodies = await self._bodies(project, page)
        return [bodies[i] for i in page if i in bodies], total

    async def _page(
        self,
        condition: str,
        params: dict[str, object],
        order: Literal["asc", "desc"],
        limit: int,
        wanted: int,
        expected: int,
        stored_rows: int,
    ) -> Sequence[str]:
        """The page's ids: the first ``window`` rows in key order (read in order, so
        ClickHouse stops after them: no FINAL, no sort of the project), netted per
        ``(created, completion_id)``.

        A full window may end inside the rows of its last ``(created, completion_id)`` and
        cut a version from its retraction, so what they add up to there is not trusted: that
        one is the last in order, so one more than the page is asked for, and when there is
        no more the last one is left out. (``LIMIT ... WITH TIES`` would keep it whole, but
        ClickHouse then reads every row of the project: 35 against 9 ms at 1,000,000 rows.)
        Retractions not yet merged away take room in the window too; when the page is
        shorter than the total says, the window is read again, longer, until it holds the
        page or every row (``stored_rows`` bounds them).
        """
        direction = "ASC" if order == "asc" else "DESC"
        key = f"ORDER BY created {direction}, completion_id {direction}"
        sql = (
            "SELECT completion_id, read FROM ("
            "SELECT created, completion_id, sum(sign) AS net, any(read) AS read FROM ("
            "SELECT created, completion_id, sign, count() OVER () AS read FROM ("
            "SELECT created, completion_id, sign FROM {database}.completion_listing "
            f"WHERE {condition} {key} LIMIT {{window:UInt64}}"
            ")) GROUP BY created, completion_id HAVING net > 0"
            f") {key} LIMIT {{more:UInt32}} OFFSET {{offset:UInt64}}"
        )
        window = wanted + _SLACK
        while True:
            rows = await self._ch.rows(sql, {**params, "window": window, "more": limit + 1})
            ids = [str(row[0]) for row in rows]
            if (rows and int(rows[0][1]) < window) or len(ids) > limit:
                return ids[:limit]  # every row read, or the last one read not in the page
            if len(ids) > expected or window > stored_rows:
                return ids[:-1]  # without the last one read, maybe cut
            window *= 4

    async def get(self, project: str, completion_id: str) -> str | None:
        return (await stored_responses(self._ch, project, [completion_id])).get(completion_id)

    async def _bodies(self, project: str, ids: Sequence[str]) -> dict[str, str]:
        """The stored responses of a page's ids.

        The listing and the responses are written by two views of the same insert (0011),
        which land one after the other: for the few milliseconds between them a page may name
        a completion whose response is not there yet, so the missing ones are read again.
        """
        found = await stored_responses(self._ch, project, ids)
        for _ in range(_BODY_RETRIES):
            missing = [i for i in ids if i not in found]
            if not missing:
                break
            await asyncio.sleep(_BODY_RETRY_S)
            found |= await stored_responses(self._ch, project, missing)
        return found
