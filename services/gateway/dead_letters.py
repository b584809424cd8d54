"""POST /v1/dead_letters/replay: the caller's project replays its own dead letters.

The same replay as ``maniac dlq replay --project P``, run by the gateway (which has the broker
and ClickHouse at hand). It is how ``maniac serve`` users replay: the embedded broker lives
inside that process, and the embedded ClickHouse may be opened by one process only.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Query, Request

from services.common.auth import ProjectDep
from services.common.errors import ServiceUnavailable
from services.common.losses import LossRepository
from services.common.replay import ReplayResult, replay
from services.common.responses import JSONResponse
from services.common.settings import GatewaySettings
from services.gateway.publisher import Publisher

router = APIRouter(tags=["Dead letters"])


class DeadLetterReplayer:
    """Replays one request at a time (two at once would read the topic twice for nothing)."""

    def __init__(
        self,
        settings: GatewaySettings,
        bootstrap: str,
        publisher: Publisher,
        losses: LossRepository,
    ) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._publisher = publisher
        self._losses = losses
        self.lock = asyncio.Lock()
        """Held while a replay runs; whoever replaces the broker under it takes it first."""

    async def replay(self, project: str, reason: str | None, dry_run: bool) -> ReplayResult:
        async with self.lock:
            try:
                return await replay(
                    bootstrap=self._bootstrap,
                    # through the publisher: what it sends counts as acknowledged, so that
                    # `maniac serve` drains it into ClickHouse before it exits
                    publish=self._publisher.publish,
                    losses=self._losses,
                    dead_letter_topic=self._settings.dead_letter_topic,
                    project=project,
                    reason=reason,
                    dry_run=dry_run,
                )
            except KafkaError as exc:
                raise ServiceUnavailable(
                    "The event broker is unavailable; nothing was replayed that is not marked. "
                    "Retry the request: a dead letter is replayed once.",
                    details={"reason": type(exc).__name__},
                ) from exc


async def _replayer(request: Request) -> DeadLetterReplayer:
    replayer: DeadLetterReplayer = request.state.dead_letter_replayer
    return replayer


@router.post("/v1/dead_letters/replay")
async def replay_dead_letters(
    project: ProjectDep,
    replayer: Annotated[DeadLetterReplayer, Depends(_replayer)],
    reason: Annotated[str | None, Query(description="substring of the reason")] = None,
    dry_run: bool = False,
) -> JSONResponse:
    """Re-publish the caller's dead letters not replayed yet (optionally those of one reason)."""
    result = await replayer.replay(project, reason, dry_run)
    return JSONResponse(
        {
            "object": "dead_letters.replay",
            "project": project,
            "selected": result.selected,
            "already_replayed": result.already,
            "replayed": result.replayed,
            "dry_run": dry_run,
        }
    )
