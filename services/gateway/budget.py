"""Backpressure at the door: a bound on the request-body bytes the gateway holds at once.

A register request holds its body from the first byte read until the broker acknowledged its
items. When the broker slows down, requests would otherwise pile up in memory without limit;
with a budget, a request that does not fit is refused at once (503 with ``Retry-After``) and
the client retries later, so the gateway's memory stays bounded whatever the load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.common.errors import PayloadTooLarge, ServiceUnavailable
from services.common.metrics import GATEWAY_BODY_BYTES, GATEWAY_OVERLOADED


class Lease:
    """The bytes one request holds; given back when the request is done with them."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
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
        """Hold ``size`` more bytes, or raise :class:`ServiceUnavailable` if they don't fit."""
        budget = self._budget
        if budget.held + size > budget.max_bytes:
            GATEWAY_OVERLOADED.inc()
            raise ServiceUnavailable(
                "The gateway holds as many request bytes as it may; retry shortly.",
                details={"reason": "overloaded", "max_inflight_bytes": budget.max_bytes},
                headers={"Retry-After": "1"},
            )
        budget.held += size
        self.held += size
        GATEWAY_BODY_BYTES.set(budget.held)


class BodyBudget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        lease = Lease(self)
        try:
            yield lease
        finally:
            self.held -= lease.held
            GATEWAY_BODY_BYTES.set(self.held)
