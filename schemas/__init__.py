"""Contracts, defined once: the HTTP API, the Kafka events, the ClickHouse schema."""

from pathlib import Path

SCHEMAS_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = SCHEMAS_DIR / "clickhouse"
OPENAPI_PATH = SCHEMAS_DIR / "openapi.json"
