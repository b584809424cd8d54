"""Backpressure at the door: a bound on the request-body bytes the gateway holds at once.

A register request holds its body from the first byte read until the broker acknowledged its
items. When the broker slows down, requests would otherwise pile up in memory without limit;
with a budget, a request that does not fit is refused at once (503 with ``Retry-After``) and
the client retries later, so the gateway's memory stays bounded whatever the load.

The budget is shared by every project, fairly: a project alone may hold all of it, but while
another project is active (holds bytes, or held or asked for some in the last
:data:`ACTIVE_S` seconds) each may hold only its share (``MANIAC_PROJECT_BUDGET_SHARE`` of
the budget). So one project importing with many large concurrent requests cannot keep every
other project's requests out; what it holds beyond its share drains as its requests end, and
its new requests are refused meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.common.errors import PayloadTooLarge, ServiceUnavailable
from services.common.metrics import GATEWAY_BODY_BYTES, GATEWAY_OVERLOADED

ACTIVE_S = 10.0
"""How long a project counts as active after it last held or asked for bytes: longer than a
client's pause between two requests, or its wait of ``Retry-After`` before it sends again."""


def project_limit(max_bytes: int, share: float, others_active: bool) -> int:
    """The bytes one project may hold: the whole budget when no other project is active."""
    return int(max_bytes * share) if others_active else max_bytes


class Lease:
    """The bytes one request holds; given back when the request is done with them."""

    def __init__(self, budget: BodyBudget, project: str) -> None:
        self._budget = budget
        self.project = project
        self.held = 0
        self._records = 0

    def take_records(self, size: int) -> None:
        """Hold ``size`` more bytes of the request's encoded records, as they are built.

        The bytes of its body, parsed and let go, stand for its records up to their number:
        only records beyond them are taken. Each register item's record repeats the
        request's ``container``, so records may outgrow their body many times (a container
        of 100 KB and 2,000 items: 200 MB of records from 170 KB); a request whose records
        would pass the whole budget is a 413, one that does not fit now a 503.
        """
        self._records += size
        if self._records > self._budget.max_bytes:
            raise PayloadTooLarge(
                "The records of this request would exceed the "
                f"{self._budget.max_bytes} bytes the gateway holds at once: each item's "
                "record carries the container, so send fewer items or a shorter container."
            )
        if self._records > self.held:
            self.take(self._records - self.held)

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise :class:`ServiceUnavailable` if they don't fit:
        in the budget, or in the project's share of it while other projects are active."""
        budget = self._budget
        limit = budget.limit(self.project)
        if limit < budget.max_bytes and budget.held_by(self.project) + size > limit:
            GATEWAY_OVERLOADED.inc()
            raise ServiceUnavailable(
                f"Project {self.project!r} holds its share ({limit} of {budget.max_bytes} "
                "bytes) of the request bytes the gateway holds at once while other projects "
                "are sending; retry shortly.",
                details={
                    "reason": "project_share",
                    "max_inflight_bytes": budget.max_bytes,
                    "project_share_bytes": limit,
                },
                headers={"Retry-After": "1"},
            )
        if budget.held + size > budget.max_bytes:
            GATEWAY_OVERLOADED.inc()
            raise ServiceUnavailable(
                "The gateway holds as many request bytes as it may; retry shortly.",
                details={"reason": "overloaded", "max_inflight_bytes": budget.max_bytes},
                headers={"Retry-After": "1"},
            )
        budget.add(self.project, size)
        self.held += size


class BodyBudget:
    def __init__(
        self,
        max_bytes: int,
        project_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.project_share = project_share
        self.held = 0
        self._clock = clock
        self._held: dict[str, int] = {}
        """Bytes held per project (projects holding none are left out)."""
        self._seen: dict[str, float] = {}
        """When each project last held or asked for bytes (forgotten after ACTIVE_S)."""

    def held_by(self, project: str) -> int:
        return self._held.get(project, 0)

    def limit(self, project: str) -> int:
        """The bytes ``project`` may hold now; asking counts as being active."""
        now = self._clock()
        self._seen[project] = now
        if self.project_share >= 1:
            return self.max_bytes
        return project_limit(self.max_bytes, self.project_share, self._others_active(project, now))

    def _others_active(self, project: str, now: float) -> bool:
        active = False
        for other, seen in list(self._seen.items()):
            if other in self._held or now - seen < ACTIVE_S:
                active = active or other != project
            else:
                del self._seen[other]
        return active

    def add(self, project: str, size: int) -> None:
        self.held += size
        self._held[project] = self._held.get(project, 0) + size
        GATEWAY_BODY_BYTES.set(self.held)

    @contextmanager
    def lease(self, project: str) -> Iterator[Lease]:
        lease = Lease(self, project)
        try:
            yield lease
        finally:
            self.held -= lease.held
            left = self._held.get(project, 0) - lease.held
            if left > 0:
                self._held[project] = left
            else:
                self._held.pop(project, None)
            self._seen[project] = self._clock()
            GATEWAY_BODY_BYTES.set(self.held)
