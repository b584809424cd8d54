"""Publishes completion events to Kafka and waits for the broker's acknowledgement."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from services.common.errors import ServiceUnavailable

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(self, producer: Any, topic: str, timeout_s: float) -> None:
        self._producer = producer
        self.topic = topic
        self._timeout_s = timeout_s
        self.acked: dict[int, int] = {}
        """Highest acknowledged offset per partition (used to drain before shutdown)."""

    async def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker acknowledged every one.

        Raises :class:`ServiceUnavailable` when the broker cannot take them in time.
        """
        if not messages:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                futures = [
                    await self._producer.send(self.topic, key=key, value=value)
                    for key, value in messages
                ]
                metadata = await asyncio.gather(*futures)
        except Exception as exc:
            log.error("publish_failed", messages=len(messages), error=repr(exc))
            raise ServiceUnavailable(
                "The event broker is unavailable; nothing in this request is guaranteed "
                "stored. Retry the request: completions are deduplicated by id.",
                details={"reason": type(exc).__name__},
            ) from exc
        for meta in metadata:
            if meta.offset > self.acked.get(meta.partition, -1):
                self.acked[meta.partition] = meta.offset
