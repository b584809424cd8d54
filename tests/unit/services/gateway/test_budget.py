"""The in-flight body budget: bytes are held per request and given back when it is done."""

from __future__ import annotations

import pytest

from services.common.errors import ServiceUnavailable
from services.gateway.budget import BodyBudget


def test_leases_hold_bytes_until_they_end_and_refuse_what_does_not_fit() -> None:
    budget = BodyBudget(100)
    with budget.lease() as first:
        first.take(60)
        with budget.lease() as second:
            second.take(40)
            with budget.lease() as third, pytest.raises(ServiceUnavailable) as refused:
                third.take(1)
            assert refused.value.headers == {"Retry-After": "1"}
            assert refused.value.details is not None
            assert refused.value.details["reason"] == "overloaded"
            assert budget.held == 100
        assert budget.held == 60
    assert budget.held == 0


def test_a_failing_request_gives_its_bytes_back() -> None:
    budget = BodyBudget(100)

    def request_that_fails() -> None:
        with budget.lease() as lease:
            lease.take(70)
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError):
        request_that_fails()
    assert budget.held == 0
