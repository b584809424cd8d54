"""Stored responses, read by id from ``completion_responses`` (migrations 0008 and 0011)."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.clickhouse import ClickHouse, StringArray


async def stored_responses(
    clickhouse: ClickHouse, project: str, ids: Sequence[str]
) -> dict[str, str]:
    """The newest stored response (JSON text) of each of these completions that has one.

    The newest version, as FINAL keeps, but without FINAL: FINAL reads the response of every
    row in each part's candidate granules before it merges, while here the id is checked first
    (PREWHERE) and only the granules holding one are decompressed (32 rows each). A version is
    stored once (the worker drops one it already has), so no two rows tie.
    """
    if not ids:
        return {}
    rows = await clickhouse.rows(
        "SELECT completion_id, response FROM {database}.completion_responses "
        "WHERE project = {project:String} AND completion_id IN {ids:Array(String)} "
        "ORDER BY received_at DESC LIMIT 1 BY completion_id",
        {"project": project, "ids": StringArray(ids)},
    )
    return {str(r[0]): r[1] for r in rows}
