from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.common.pricing import (
    SPEND_CLASSES,
    PriceCatalog,
    compute_spend,
    spend_columns,
    split_model,
)

CATALOG = PriceCatalog.from_dict(
    {
        "prices": [
            {
                "provider": "openai",
                "model": "gpt-4o",
                "effective": "2024-05-13",
                "prompt": "5.00",
                "completion": "15.00",
            },
            {
                "provider": "openai",
                "model": "gpt-4o",
                "effective": "2024-10-01",
                "prompt": "2.50",
                "cached_prompt": "1.25",
                "completion": "10.00",
            },
            {
                "provider": "deep",
                "model": "r1",
                "effective": "2025-01-01",
                "prompt": "1",
                "completion": "2",
                "reasoning": "4",
            },
        ]
    }
)


def _at(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def _counts(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "reasoning_tokens": reasoning,
    }


@pytest.mark.parametrize(
    ("provider", "model", "day", "version"),
    [
        ("openai", "gpt-4o", "2024-06-01", "openai/gpt-4o@2024-05-13"),
        ("openai", "gpt-4o", "2024-10-01", "openai/gpt-4o@2024-10-01"),
        ("", "openai/gpt-4o", "2025-01-01", "openai/gpt-4o@2024-10-01"),
        ("", "gpt-4o", "2025-01-01", "openai/gpt-4o@2024-10-01"),
        ("openai", "gpt-4o", "2024-01-01", None),
        ("openai", "gpt-5", "2025-01-01", None),
        ("other", "gpt-4o", "2025-01-01", None),
    ],
)
def test_price_in_force_when_created(
    provider: str, model: str, day: str, version: str | None
) -> None:
    price = CATALOG.find(provider, model, _at(day))
    assert (price.version if price else None) == version


def test_remembered_answers_follow_the_day_a_price_changes() -> None:
    catalog = PriceCatalog.from_dict({"prices": [{"provider": "openai", "model": "gpt-4o",
        "effective": "2024-10-01", "prompt": "2.50", "completion": "10.00"}]})  # fmt: skip
    last_second = _at("2024-10-01") - 1
    for _ in range(2):  # asked again: the same answers, from memory
        assert catalog.find("openai", "gpt-4o", last_second) is None
        price = catalog.find("openai", "gpt-4o", _at("2024-10-01"))
        assert price is not None
        assert price.version == "openai/gpt-4o@2024-10-01"
        assert catalog.find("openai", "gpt-4o", _at("2024-10-01") + 86_399.9) == price
        assert catalog.find("", "openai/gpt-4o", last_second) is None


def test_spend_by_class_is_exact() -> None:
    price = CATALOG.find("openai", "gpt-4o", _at("2025-01-01"))
    assert price is not None
    spend = compute_spend(price, _counts(prompt=1000, completion=200, cached=400))
    assert spend.input == Decimal("0.0015")  # 600 * 2.50 / 1e6
    assert spend.cache_read == Decimal("0.0005")  # 400 * 1.25 / 1e6
    assert spend.output == Decimal("0.002")
    assert spend.reasoning == 0
    assert spend.total == Decimal("0.004")
    assert isinstance(spend.total, Decimal)


def test_spend_columns_name_every_class_with_or_without_a_price() -> None:
    price = CATALOG.find("deep", "r1", _at("2025-06-01"))
    assert price is not None
    spend = compute_spend(price, _counts(prompt=10, completion=1_000_000, reasoning=250_000))
    computed = spend_columns(spend)
    unknown = spend_columns(None)
    assert computed.keys() == unknown.keys()
    assert [computed[column] for column in SPEND_CLASSES] == [
        spend.input,
        spend.cache_read,
        spend.cache_write,
        spend.reasoning,
        spend.output,
    ]
    assert computed["spend"] == spend.total == sum(computed[c] for c in SPEND_CLASSES)
    assert computed["spend_source"] == "computed"
    assert computed["price_version"] == "deep/r1@2025-01-01"
    assert unknown["spend"] is None
    assert all(unknown[column] == 0 for column in SPEND_CLASSES)


def test_cache_writes_at_their_own_price() -> None:
    catalog = PriceCatalog.from_dict(
        {
            "prices": [
                {
                    "provider": "anthropic",
                    "model": "claude",
                    "effective": "2025-01-01",
                    "prompt": "3",
                    "cached_prompt": "0.3",
                    "cache_write": "3.75",
                    "completion": "15",
                }
            ]
        }
    )
    price = catalog.find("anthropic", "claude", _at("2025-06-01"))
    assert price is not None
    counts = {
        **_counts(prompt=1_000_000, completion=0, cached=200_000),
        "cache_write_tokens": 300_000,
    }
    spend = compute_spend(price, counts)
    assert spend.input == Decimal("1.5")  # 500k uncached x 3
    assert spend.cache_read == Decimal("0.06")
    assert spend.cache_write == Decimal("1.125")
    assert spend.total == Decimal("2.685")


def test_reasoning_tokens_at_their_own_price() -> None:
    price = CATALOG.find("deep", "r1", _at("2025-06-01"))
    assert price is not None
    spend = compute_spend(price, _counts(prompt=0, completion=1_000_000, reasoning=250_000))
    assert spend.reasoning == Decimal(1)
    assert spend.output == Decimal("1.5")
    assert spend.total == Decimal("2.5")


def test_shipped_catalogue_loads() -> None:
    catalog = PriceCatalog.load()
    assert catalog.find("openai", "gpt-4o-mini", _at("2025-01-01")) is not None


@pytest.mark.parametrize(
    ("provider", "model", "expected"),
    [
        ("", "openai/gpt-4o", ("openai", "gpt-4o")),
        ("openai", "openai/gpt-4o", ("openai", "gpt-4o")),
        ("openrouter", "anthropic/claude", ("openrouter", "anthropic/claude")),
        ("", "gpt-4o", ("", "gpt-4o")),
    ],
)
def test_split_model(provider: str, model: str, expected: tuple[str, str]) -> None:
    assert split_model(provider, model) == expected
