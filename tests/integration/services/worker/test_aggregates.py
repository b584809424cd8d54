"""Aggregates maintained at insert time equal a count over the deduplicated raw table,
whatever is re-delivered or registered again."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.common.clickhouse import ClickHouse
from services.common.settings import ServeSettings
from tests.conftest import Broker, eventually
from tests.support.worker import RunningWorker, all_committed, event, produce

MEASURES = (
    "requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
    "total_tokens, spend"
)
RAW = (
    "SELECT container, model, count(), sum(prompt_tokens), sum(completion_tokens), "
    "sum(cached_tokens), sum(reasoning_tokens), sum(total_tokens), sum(ifNull(spend, 0)) "
    "FROM {database}.completions FINAL WHERE project = 'p' GROUP BY container, model "
    "ORDER BY container, model"
)


def _agg(table: str) -> str:
    sums = ", ".join(f"sum({m})" for m in MEASURES.split(", "))
    return (
        f"SELECT container, model, {sums} FROM {{database}}.{table} WHERE project = 'p' "
        "GROUP BY container, model ORDER BY container, model"
    )


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _messages(version: int, changed: bool = False) -> list[tuple[bytes, bytes]]:
    messages = []
    for i in range(30):
        model = ["openai/gpt-4o", "openai/gpt-4o-mini", "unknown/model"][i % 3]
        usage = _usage(100 + i + (1000 if changed else 0), 10 + i, cached=i)
        extra: dict[str, Any] = {"model": model, "usage": usage, "created": 1_750_000_000 + i * 600}
        if i % 5 == 0:
            extra["spend"] = 0.01 * i  # the caller's own figure is kept
        key, value = event(f"id-{i}", **extra)
        value = value.replace(b'"received_at_ms":1700000000000', b'"received_at_ms":%d' % version)
        messages.append((key, value))
    return messages


async def _same(ch: ClickHouse) -> bool:
    raw = await ch.rows(RAW)
    return bool(raw) and [list(r) for r in raw] == [
        list(r) for r in await ch.rows(_agg("usage_hourly"))
    ]


async def test_aggregates_count_each_completion_once(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    first = _messages(version=1_700_000_000_000)
    again = _messages(version=1_700_000_000_000)  # the same records delivered twice
    changed = _messages(version=1_700_000_001_000, changed=True)[:10]  # registered again
    await produce(producer, settings.topic, first + again + changed)
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 70))

    assert await _same(clickhouse)
    assert [list(r) for r in await clickhouse.rows(_agg("usage_daily"))] == [
        list(r) for r in await clickhouse.rows(_agg("usage_hourly"))
    ]
    [(requests, prompt)] = await clickhouse.rows(
        "SELECT sum(requests), sum(prompt_tokens) FROM {database}.usage_hourly"
    )
    assert requests == 30
    assert prompt == sum(100 + i for i in range(30)) + 1000 * 10

    # the whole topic again, through a new consumer group: nothing changes
    replay = settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"})
    async with RunningWorker(replay, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 70))
    assert await _same(clickhouse)


async def test_spend_is_computed_at_the_price_in_force_and_unknown_models_are_counted(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    usage = _usage(1000, 200, cached=400)
    await produce(
        producer,
        settings.topic,
        [
            event("priced", model="openai/gpt-4o", usage=usage, created=1_750_000_000),
            event(
                "old-price", model="gpt-4o", provider="openai", usage=usage, created=1_720_000_000
            ),
            event("given", model="openai/gpt-4o", usage=usage, spend=0.5, created=1_750_000_000),
            event("unknown", model="nobody/else", usage=usage, created=1_750_000_000),
            event("no-usage", model="openai/gpt-4o", created=1_750_000_000),
        ],
    )
    async with RunningWorker(settings, broker, clickhouse, prices=True) as worker:
        await eventually(lambda: all_committed(worker, 5))
    rows = {
        r[0]: r[1:]
        for r in await clickhouse.rows(
            "SELECT completion_id, spend, spend_source, price_version, spend_input, "
            "spend_cache_read, spend_output FROM {database}.completions FINAL"
        )
    }
    assert rows["priced"] == (
        Decimal("0.004"),
        "computed",
        "openai/gpt-4o@2024-10-01",
        Decimal("0.0015"),
        Decimal("0.0005"),
        Decimal("0.002"),
    )
    assert rows["old-price"][:3] == (Decimal("0.008"), "computed", "openai/gpt-4o@2024-05-13")
    assert rows["given"][:2] == (Decimal("0.5"), "caller")
    assert rows["unknown"][:2] == (None, "unknown")
    assert rows["no-usage"][:2] == (None, "no_usage")
    [(unpriced,)] = await clickhouse.rows("SELECT sum(unpriced) FROM {database}.usage_hourly")
    assert unpriced == 2


async def test_usage_that_breaks_invariants_is_flagged_not_zeroed(
    settings: ServeSettings, broker: Broker, clickhouse: ClickHouse, producer: Any
) -> None:
    bad = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 99,
        "prompt_tokens_details": {"cached_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 9},
    }
    await produce(producer, settings.topic, [event("odd", usage=bad), event("none")])
    async with RunningWorker(settings, broker, clickhouse) as worker:
        await eventually(lambda: all_committed(worker, 2))
    rows = {
        r[0]: r[1:]
        for r in await clickhouse.rows(
            "SELECT completion_id, usage_source, usage_flags, cached_tokens, total_tokens "
            "FROM {database}.completions FINAL"
        )
    }
    assert rows["odd"] == (
        "provider",
        ["cached_gt_prompt", "reasoning_gt_completion", "total_mismatch"],
        50,
        99,
    )
    assert rows["none"][:2] == ("none", [])
