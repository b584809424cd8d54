from __future__ import annotations

from typing import Any

import pytest

from services.common.records import (
    RecordError,
    content_completion_id,
    normalize_slug,
    parse_created,
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


def test_usage_counts_absent_is_zero() -> None:
    assert set(usage_counts(None).values()) == {0}


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param({"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0}, id="neg"),
        pytest.param({"prompt_tokens": "3", "completion_tokens": 0, "total_tokens": 0}, id="str"),
        pytest.param(
            {
                "prompt_tokens": 1,
                "completion_tokens": 0,
                "total_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": -2},
            },
            id="neg-cached",
        ),
    ],
)
def test_usage_counts_refuses(usage: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        usage_counts(usage)


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
