"""Contracts, defined once: the HTTP API, the Kafka events, the ClickHouse schema."""

from pathlib import Path

SCHEMAS_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = SCHEMAS_DIR / "clickhouse"
OPENAPI_PATH = SCHEMAS_DIR / "openapi.json"

COMPLETIONS_INSERT_TABLE = "completions_in"
"""Where completions are written (migration 0011): rows of ``completions`` with the response,
split by views into ``completions`` and ``completion_responses``."""

COMPLETIONS_INSERT_COLUMNS = (
    "project",
    "completion_id",
    "created",
    "received_at",
    "kind",
    "model",
    "provider",
    "container",
    "model_id",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "spend",
    "spend_source",
    "price_version",
    "spend_input",
    "spend_cache_read",
    "spend_cache_write",
    "spend_reasoning",
    "spend_output",
    "usage_source",
    "usage_flags",
    "tags",
    "trace_id",
    "response",
    "request",
    "operation_id",
    "status",
    "stream",
    "ttft_ms",
    "latency_ms",
    "attempts",
    "agg_sign",
)
"""The columns of a completion row as the worker writes it: one JSON array of these values per
row (JSONCompactEachRow, which ClickHouse parses faster than objects naming every column). The
table's other column, ``inserted_at``, takes its default."""

USAGE_DIMENSIONS = ("container", "model", "provider")
"""What ``usage_hourly`` and ``usage_daily`` group by, beside ``project`` and ``bucket``."""

USAGE_COUNTS = (
    "requests",
    "errors",
    "unpriced",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
)
"""The counts each group of ``usage_hourly`` and ``usage_daily`` sums (beside ``spend`` and the
latency quantiles)."""
