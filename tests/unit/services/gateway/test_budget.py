"""The in-flight body budget: bytes are held per request and given back when it is done, and a
project holds at most its share of them while other projects are active."""

from __future__ import annotations

import pytest

from services.common.errors import ServiceUnavailable
from services.gateway.budget import ACTIVE_S, BodyBudget, project_limit


def test_leases_hold_bytes_until_they_end_and_refuse_what_does_not_fit() -> None:
    budget = BodyBudget(100)
    with budget.lease("p") as first:
        first.take(60)
        with budget.lease("p") as second:
            second.take(40)
            with budget.lease("p") as third, pytest.raises(ServiceUnavailable) as refused:
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
        with budget.lease("p") as lease:
            lease.take(70)
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError):
        request_that_fails()
    assert budget.held == 0
    assert budget.held_by("p") == 0


@pytest.mark.parametrize(
    ("share", "others_active", "limit"),
    [(0.5, False, 1000), (0.5, True, 500), (0.25, True, 250), (1.0, True, 1000)],
    ids=["alone", "shared", "quarter", "no-share"],
)
def test_project_limit(share: float, others_active: bool, limit: int) -> None:
    assert project_limit(1000, share, others_active) == limit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_project_alone_may_hold_the_whole_budget() -> None:
    budget = BodyBudget(100, 0.5, Clock())
    with budget.lease("a") as first, budget.lease("a") as second:
        first.take(60)
        second.take(40)
        assert budget.held_by("a") == 100


def test_while_another_project_is_active_a_project_holds_only_its_share() -> None:
    clock = Clock()
    budget = BodyBudget(100, 0.5, clock)
    with budget.lease("a") as big:
        big.take(80)  # alone: past its share
        with budget.lease("b") as small:
            small.take(10)
        clock.now += ACTIVE_S - 1  # b is still active, holding nothing
        with budget.lease("a") as more, pytest.raises(ServiceUnavailable) as refused:
            more.take(1)
        assert refused.value.headers == {"Retry-After": "1"}
        assert refused.value.details == {
            "reason": "project_share",
            "max_inflight_bytes": 100,
            "project_share_bytes": 50,
        }
        assert "'a' holds its share" in refused.value.message
        with budget.lease("b") as again:
            again.take(20)  # what a no longer takes is b's
        clock.now += ACTIVE_S  # b went quiet: a may have it all again
        with budget.lease("a") as more:
            more.take(20)
            assert budget.held_by("a") == 100
    assert budget.held == 0


def test_a_refused_project_counts_as_active() -> None:
    budget = BodyBudget(100, 0.5, Clock())
    with budget.lease("a") as big:
        big.take(100)
        with budget.lease("b") as small, pytest.raises(ServiceUnavailable) as refused:
            small.take(10)  # under its share, but nothing is left: the budget's own 503
        assert refused.value.details is not None
        assert refused.value.details["reason"] == "overloaded"
        with budget.lease("a") as more, pytest.raises(ServiceUnavailable) as capped:
            more.take(1)
        assert capped.value.details is not None
        assert capped.value.details["reason"] == "project_share"


def test_a_project_under_its_share_is_held_to_the_budget_only() -> None:
    budget = BodyBudget(100, 0.5, Clock())
    with budget.lease("a") as a, budget.lease("b") as b:
        a.take(50)
        b.take(50)
        with budget.lease("c") as c, pytest.raises(ServiceUnavailable) as refused:
            c.take(1)
        assert refused.value.details is not None
        assert refused.value.details["reason"] == "overloaded"
