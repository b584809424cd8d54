"""Re-pricing history moves spend and aggregates by exactly the difference."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from services.common.bodies import stored_responses
from services.common.clickhouse import ClickHouse
from services.common.pricing import PriceCatalog
from services.common.settings import ServeSettings
from services.worker.reprice import reprice
from tests.conftest import Broker, eventually
from tests.support.worker import RunningWorker, all_committed, event, produce, store

USAGE = {"prompt_tokens": 1_000_000, "completion_tokens": 0, "total_tokens": 1_000_000}
CORRECTED = PriceCatalog.from_dict(
    {
        "prices": [
            {
                "provider": "openai",
                "model": "gpt-4o",
                "effective": "2024-10-01",
                "prompt": "2.00",
                "completion": "10.00",
            },
            {
                "provider": "new",
                "model": "model",
                "effective": "2024-01-01",
                "prompt": "1.00",
                "completion": "1.00",
            },
        ]
    }
)


async def _spend(ch: ClickHouse, table: str = "completions FINAL") -> Decimal:
    column = "ifNull(spend, 0)" if table.startswith("completions") else "spend"
    [(total,)] = await ch.rows(f"SELECT sum({column}) FROM {{database}}.{table}")
    return Decimal(total)


async def test_reprice_corrects_spend_and_aggregates_once(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    created = 1_750_000_000
    await produce(
        producer,
        settings.topic,
        [
            event("a", model="openai/gpt-4o", usage=USAGE, created=created),
            event("b", model="openai/gpt-4o", usage=USAGE, created=created + 60),
            event("mine", model="openai/gpt-4o", usage=USAGE, spend=9, created=created),
            event("was-unknown", model="new/model", usage=USAGE, created=created),
            event("outside", model="openai/gpt-4o", usage=USAGE, created=created - 86400 * 30),
        ],
    )
    async with RunningWorker(settings, broker, clickhouse, prices=True) as worker:
        await eventually(lambda: all_committed(worker, 5))
    assert await _spend(clickhouse) == Decimal("2.5") * 3 + 9
    assert await _spend(clickhouse, "usage_hourly") == await _spend(clickhouse)

    start = datetime.fromtimestamp(created - 3600, UTC)
    end = datetime.fromtimestamp(created + 3600, UTC)
    dry = await reprice(clickhouse, CORRECTED, start, end, dry_run=True, chunk=2)
    assert (dry.examined, dry.changed) == (3, 3)
    assert await _spend(clickhouse) == Decimal("16.5")  # nothing written

    result = await reprice(clickhouse, CORRECTED, start, end, chunk=1)  # a page per row
    assert result.changed == 3
    assert result.delta == Decimal("-1") + Decimal(1)  # a, b: -0.5 each; was-unknown: +1
    spend = {
        r[0]: (r[1], r[2])
        for r in await clickhouse.rows(
            "SELECT completion_id, spend, price_version FROM {database}.completions FINAL"
        )
    }
    assert spend["a"] == (Decimal(2), "openai/gpt-4o@2024-10-01")
    assert spend["was-unknown"] == (Decimal(1), "new/model@2024-01-01")
    assert spend["mine"][0] == Decimal(9)
    assert spend["outside"][0] == Decimal("2.5")
    # and what get and list return: the stored response carries the new spend
    responses = await stored_responses(clickhouse, "p", ["a", "was-unknown", "outside"])
    assert {i: orjson.loads(r)["spend"] for i, r in responses.items()} == {
        "a": 2,
        "was-unknown": 1,
        "outside": 2.5,
    }
    assert await _spend(clickhouse) == Decimal("16.5")
    assert await _spend(clickhouse, "usage_hourly") == await _spend(clickhouse)
    [(requests, unpriced)] = await clickhouse.rows(
        "SELECT sum(requests), sum(unpriced) FROM {database}.usage_hourly"
    )
    assert (requests, unpriced) == (5, 0)

    again = await reprice(clickhouse, CORRECTED, start, end)
    assert again.changed == 0


async def test_a_spend_of_many_digits_is_repriced_exactly_and_once(
    clickhouse: ClickHouse,
) -> None:
    # 19 significant digits: more than a float holds
    created = 1_750_000_000
    big = {"prompt_tokens": 499_999_999_999, "completion_tokens": 499_999_999_999}
    big["total_tokens"] = big["prompt_tokens"] + big["completion_tokens"]
    await store(clickhouse, [event("big", model="openai/gpt-4o", usage=big, created=created)[1]])
    exact = PriceCatalog.from_dict(
        {
            "prices": [
                {
                    "provider": "openai",
                    "model": "gpt-4o",
                    "effective": "2024-10-01",
                    "prompt": "2.123457",
                    "completion": "15.123457",
                }
            ]
        }
    )
    start = datetime.fromtimestamp(created - 3600, UTC)
    end = datetime.fromtimestamp(created + 3600, UTC)
    first = await reprice(clickhouse, exact, start, end)
    expected = Decimal(499_999_999_999) * (Decimal("2.123457") + Decimal("15.123457")) / 10**6
    assert first.changed == 1
    assert first.delta == expected
    for _ in range(2):
        again = await reprice(clickhouse, exact, start, end)
        assert (again.examined, again.changed, again.delta) == (1, 0, Decimal(0))
    assert await _spend(clickhouse) == expected
    assert await _spend(clickhouse, "usage_hourly") == expected
    assert await _spend(clickhouse, "usage_daily") == expected
