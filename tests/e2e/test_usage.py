"""GET /v1/usage: the aggregates, through the API, scoped to the caller's project."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, KEY_B, RunningStack

DAY = 1_750_032_000  # 2025-06-16T00:00:00Z


def _item(n: int, model: str, created: int) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": f"q{n}"}]},
        "output": {
            "id": f"u-{n}",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": 1000,
                "completion_tokens": 100,
                "total_tokens": 1100,
                "prompt_tokens_details": {"cached_tokens": 200},
            },
        },
    }


async def _register(api: RunningStack) -> None:
    batches = {
        "alpha": [_item(i, "openai/gpt-4o", DAY + i * 3600) for i in range(4)],
        "beta": [_item(10 + i, "openai/gpt-4o-mini", DAY + 86400 + i) for i in range(2)],
    }
    async with api.client(KEY_A) as client:
        for container, items in batches.items():
            for _ in range(2):  # registered twice: counted once
                response = await client.post(
                    "/v1/chat/completions/register", json={"container": container, "items": items}
                )
                assert response.json()["ok"]


async def _usage(api: RunningStack, key: dict[str, str], **params: Any) -> dict[str, Any]:
    async with api.client(key) as client:
        response = await client.get(
            "/v1/usage", params={"from": DAY, "to": DAY + 3 * 86400, **params}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def test_usage_by_day_model_and_container(api: RunningStack) -> None:
    await _register(api)

    async def all_counted() -> bool:
        data = (await _usage(api, KEY_A))["data"]
        return bool(sum(d["requests"] for d in data) == 6)

    await eventually(all_counted)
    assert api.stack.worker is not None
    assert api.stack.publisher is not None
    assert await api.stack.worker.drain(dict(api.stack.publisher.acked), 20)

    daily = await _usage(api, KEY_A, group_by="container,model")
    assert daily["granularity"] == "day"
    assert daily["group_by"] == ["container", "model"]
    rows = {(d["bucket"], d["container"], d["model"]): d for d in daily["data"]}
    alpha = rows[("2025-06-16T00:00:00Z", "alpha", "openai/gpt-4o")]
    assert alpha["requests"] == 4
    assert alpha["prompt_tokens"] == 4000
    assert alpha["cached_tokens"] == 800
    # 4 x (800 x 2.50 + 200 x 1.25 + 100 x 10.00) / 1e6
    assert Decimal(str(alpha["spend"])) == Decimal("0.013")
    beta = rows[("2025-06-17T00:00:00Z", "beta", "openai/gpt-4o-mini")]
    assert beta["requests"] == 2

    hourly = await _usage(api, KEY_A, granularity="hour", container="alpha")
    assert [d["bucket"] for d in hourly["data"]] == [f"2025-06-16T0{h}:00:00Z" for h in range(4)]
    by_model = await _usage(api, KEY_A, model="openai:gpt-4o-mini")
    assert sum(d["requests"] for d in by_model["data"]) == 2

    assert (await _usage(api, KEY_B))["data"] == []

    # a range that cuts buckets gets the whole buckets it overlaps, and says so
    cut = await _usage(api, KEY_A, **{"from": DAY + 5, "to": DAY + 86400 + 1})
    assert (cut["from"], cut["to"]) == ("2025-06-16T00:00:00Z", "2025-06-18T00:00:00Z")
    assert sum(d["requests"] for d in cut["data"]) == 6
    cut = await _usage(api, KEY_A, granularity="hour", **{"from": DAY + 3605, "to": DAY + 7200})
    assert [(d["bucket"], d["requests"]) for d in cut["data"]] == [("2025-06-16T01:00:00Z", 1)]
    # times beyond the buckets' range are taken as its ends
    everything = await _usage(api, KEY_A, **{"from": "0001-01-01", "to": "9999-01-01"})
    assert (everything["from"], everything["to"]) == (
        "1970-01-01T00:00:00Z",
        "2106-01-01T00:00:00Z",
    )
    assert sum(d["requests"] for d in everything["data"]) == 6


async def test_a_group_emptied_by_registering_its_completion_elsewhere_is_not_shown(
    api: RunningStack,
) -> None:
    assert api.stack.worker is not None
    assert api.stack.publisher is not None
    async with api.client(KEY_B) as client:
        for container in ("gamma", "delta"):  # the same id, stored, then moved elsewhere
            response = await client.post(
                "/v1/chat/completions/register",
                json={"container": container, "items": [_item(20, "openai/gpt-4o", DAY)]},
            )
            assert response.json()["ok"]
            assert await api.stack.worker.drain(dict(api.stack.publisher.acked), 20)

    groups = (await _usage(api, KEY_B, group_by="container"))["data"]
    # gamma's counts were taken back: it nets to nothing, and is no group of the answer
    assert [(d["container"], d["requests"]) for d in groups] == [("delta", 1)]


@pytest.mark.parametrize(
    "params",
    [
        {"granularity": "week"},
        {"group_by": "colour"},
        {"from": "yesterday"},
        {"from": 200, "to": 100},
    ],
)
async def test_bad_usage_parameters_are_422(api: RunningStack, params: dict[str, Any]) -> None:
    async with api.client(KEY_A) as client:
        response = await client.get("/v1/usage", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


async def test_usage_needs_a_key(api: RunningStack) -> None:
    async with api.client() as client:
        response = await client.get("/v1/usage")
    assert response.status_code == 401
