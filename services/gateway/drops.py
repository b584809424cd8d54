"""Drop records: created completions the gateway served but could not publish, kept in ClickHouse.

Best-effort and off the request path: :meth:`DropRecorder.add` only appends to a bounded buffer;
a background task writes it in batches. While ClickHouse is down the buffer waits (oldest
records given up first when it is full, counted); the Prometheus counters, incremented before
anything here, are never lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import structlog

from services.common.logging import detached
from services.common.losses import Dropped
from services.common.metrics import DROPS_UNRECORDED

log = structlog.get_logger(__name__)


class DropSink(Protocol):
    """Where drop records go: :class:`services.common.losses.LossRepository`."""

    async def record_dropped(self, drops: Sequence[Dropped]) -> None: ...


class DropRecorder:
    def __init__(
        self,
        losses: DropSink,
        *,
        max_buffer: int = 10_000,
        interval_s: float = 1.0,
        batch: int = 1_000,
    ) -> None:
        self._losses = losses
        self._max = max_buffer
        self._interval_s = interval_s
        self._batch = batch
        self._buffer: deque[Dropped] = deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, drop: Dropped) -> None:
        """Queue one drop record; never waits (called from the publisher's callbacks)."""
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            DROPS_UNRECORDED.inc()
        self._buffer.append(drop)
        if self._task is None:
            self._task = detached(self._run(), name="drop-recorder")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.write()

    async def write(self) -> bool:
        """Write what is buffered; False (kept for the next try) when ClickHouse fails."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
            try:
                await self._losses.record_dropped(batch)
            except Exception as exc:
                room = self._max - len(self._buffer)
                kept = batch[len(batch) - room :] if room < len(batch) else batch
                DROPS_UNRECORDED.inc(len(batch) - len(kept))
                self._buffer.extendleft(reversed(kept))
                log.warning("drop_records_not_written", records=len(batch), error=repr(exc))
                return False
            log.info("drop_records_written", records=len(batch))
        return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the background task and make one last bounded attempt."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.write()
        if self._buffer:
            DROPS_UNRECORDED.inc(len(self._buffer))
            log.error("drop_records_not_written", records=len(self._buffer), at="shutdown")
            self._buffer.clear()
