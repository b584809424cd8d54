from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from services.common.records import (
    MAX_SPEND,
    MAX_TOKENS,
    RecordError,
    content_completion_id,
    normalize_slug,
    parse_created,
    parse_spend,
    usage_counts,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param(1700000000, 1700000000.0, id="int-seconds"),
        pytest.param(1700000000.5, 1700000000.5, id="float-seconds"),
        pytest.param(1700000000123, 1700000000.123, id="milliseconds"),
        pytest.param("1700000000", 1700000000.0, id="numeric-string"),
        pytest.param("2023-11-14T22:13:20Z", 1700000000.0, id="iso-z"),
        pytest.param("2023-11-14T22:13:20", 1700000000.0, id="iso-naive-is-utc"),
        pytest.param("2023-11-15T00:13:20+02:00", 1700000000.0, id="iso-offset"),
    ],
)
def test_parse_created(value: Any, expected: float | None) -> None:
    assert parse_created(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(True, id="bool"),
        pytest.param("yesterday", id="words"),
        pytest.param(-5, id="negative"),
        pytest.param(float("inf"), id="inf"),
        pytest.param({"t": 1}, id="object"),
        pytest.param(5e12 * 1000, id="far-future"),
    ],
)
def test_parse_created_refuses(value: Any) -> None:
    with pytest.raises(RecordError):
        parse_created(value)


def test_usage_counts_reads_details() -> None:
    counts = usage_counts(
        {
            "prompt_tokens": 10,
            "completion_tokens": 5.0,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    )
    assert counts == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cached_tokens": 4,
        "reasoning_tokens": 2,
        "cache_write_tokens": 0,
    }


def test_usage_counts_reads_cache_writes() -> None:
    anthropic_style = {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 11,
        "cache_creation_input_tokens": 6,
    }
    assert usage_counts(anthropic_style)["cache_write_tokens"] == 6
    openai_style = {**anthropic_style, "prompt_tokens_details": {"cache_write_tokens": 3}}
    assert usage_counts(openai_style)["cache_write_tokens"] == 3


@pytest.mark.parametrize(
    ("usage", "loc"),
    [
        pytest.param(
            {"cache_creation_input_tokens": -6},
            ("output", "usage", "cache_creation_input_tokens"),
            id="anthropic",
        ),
        pytest.param(
            {"prompt_tokens_details": {"cache_write_tokens": "6"}},
            ("output", "usage", "prompt_tokens_details", "cache_write_tokens"),
            id="openai",
        ),
    ],
)
def test_a_bad_cache_write_count_is_located_where_it_was_given(
    usage: dict[str, Any], loc: tuple[str, ...]
) -> None:
    with pytest.raises(RecordError) as raised:
        usage_counts({"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11, **usage})
    assert raised.value.loc == loc


def test_usage_counts_absent_is_zero() -> None:
    assert set(usage_counts(None).values()) == {0}


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param({"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0}, id="neg"),
        pytest.param({"prompt_tokens": "3", "completion_tokens": 0, "total_tokens": 0}, id="str"),
        pytest.param({"prompt_tokens": True, "completion_tokens": 0, "total_tokens": 1}, id="bool"),
        pytest.param(
            {
                "prompt_tokens": 1,
                "completion_tokens": 0,
                "total_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": -2},
            },
            id="neg-cached",
        ),
        pytest.param(
            {"prompt_tokens": 1e30, "completion_tokens": 0, "total_tokens": 0}, id="too-many"
        ),
        pytest.param(
            {
                "prompt_tokens": 1,
                "completion_tokens": 0,
                "total_tokens": 1,
                "completion_tokens_details": {"reasoning_tokens": MAX_TOKENS + 1},
            },
            id="too-many-reasoning",
        ),
    ],
)
def test_usage_counts_refuses(usage: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        usage_counts(usage)


def test_usage_counts_keeps_the_largest_allowed_count() -> None:
    usage = {"prompt_tokens": MAX_TOKENS, "completion_tokens": 0, "total_tokens": MAX_TOKENS}
    assert usage_counts(usage)["prompt_tokens"] == MAX_TOKENS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (0.0000535, Decimal("0.0000535")),
        ("1.25", Decimal("1.25")),
        (-2, Decimal("-2")),
        (1e-300, Decimal(0)),  # to the spend columns' 12 places, half to even
        ("0.1234567890125", Decimal("0.123456789012")),
        ("0.1234567890135", Decimal("0.123456789014")),
        (12345678901.123456789012, Decimal("12345678901.123457")),  # all a float holds
        (10**15, MAX_SPEND),
    ],
)
def test_parse_spend(value: Any, expected: Decimal | None) -> None:
    assert parse_spend(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("lots", id="not-a-number"),
        pytest.param(True, id="bool"),
        pytest.param([1], id="list"),
        pytest.param("NaN", id="nan"),
        pytest.param("Infinity", id="infinite"),
        # Decimal(38, 12) holds less than 10^26: a larger spend could never be inserted.
        pytest.param(1e30, id="beyond-the-column"),
        pytest.param(-1e16, id="beyond-the-limit"),
    ],
)
def test_parse_spend_refuses(value: Any) -> None:
    with pytest.raises(RecordError) as raised:
        parse_spend(value)
    assert raised.value.loc == ("output", "spend")


@pytest.mark.parametrize(
    ("slug", "expected"),
    [
        ("openai/gpt-4o", "openai/gpt-4o"),
        ("openai:gpt-4o", "openai/gpt-4o"),
        ("maniac:support", "maniac/support"),
        ("ollama/llama3:8b", "ollama/llama3:8b"),
        ("ollama:llama3:8b", "ollama/llama3:8b"),
        ("openrouter:anthropic/claude-sonnet-4", "openrouter/anthropic/claude-sonnet-4"),
        ("gpt-4o", "gpt-4o"),
    ],
)
def test_normalize_slug(slug: str, expected: str) -> None:
    assert normalize_slug(slug) == expected


def test_content_completion_id_is_stable_and_scoped() -> None:
    item = {"input": {"messages": [], "model": "m"}, "tags": ["a"]}
    reordered = {"tags": ["a"], "input": {"model": "m", "messages": []}}
    first = content_completion_id("p", "c", item)
    assert first.startswith("chatcmpl-")
    assert first == content_completion_id("p", "c", reordered)
    assert first != content_completion_id("p", "other", item)
    assert first != content_completion_id("q", "c", item)
