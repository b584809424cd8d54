"""Contracts, defined once: the HTTP API, the Kafka events, the ClickHouse schema."""

from pathlib import Path

SCHEMAS_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = SCHEMAS_DIR / "clickhouse"
OPENAPI_PATH = SCHEMAS_DIR / "openapi.json"

COMPLETIONS_INSERT_TABLE = "completions_in"
"""Where completions are written (migration 0011): rows of ``completions`` with the response,
split by views into ``completions`` and ``completion_responses``."""
