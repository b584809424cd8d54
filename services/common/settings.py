"""Settings, read from ``MANIAC_*`` environment variables (and a ``.env`` file).

One class per service. They share :class:`CommonSettings` (where the broker and ClickHouse are);
``maniac serve`` runs every service in one process and so uses :class:`ServeSettings`, which is
all of them together. Settings are built once at start-up and passed down, never imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import COMPLETIONS_TOPIC, DEAD_LETTER_TOPIC


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MANIAC_", env_file=".env", extra="ignore")

    kafka_bootstrap: str | None = Field(
        default=None,
        description="host:port[,host:port]; unset means the embedded broker of `maniac serve`.",
    )
    clickhouse_url: str | None = Field(
        default=None,
        description="http(s)://user:pass@host:8123/db or chdb:///abs/path; "
        "unset means chDB under the data dir.",
    )
    data_dir: Path = Path(".maniac")
    topic: str = COMPLETIONS_TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    topic_partitions: int | None = Field(
        default=None,
        ge=1,
        description="Partitions of the topics when they are created (existing ones are left "
        "as they are); unset means 1 for `maniac serve` and 4 for the services on their own.",
    )
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        description="Brokers that keep a copy of each record of the topics when they are "
        "created; 3 on a production cluster (with min.insync.replicas 2).",
    )
    api_keys: SecretStr | None = Field(
        default=None, description='Keys to seed at start-up: "projA:key1,projB:key2".'
    )
    keys_refresh_s: float = Field(default=5.0, gt=0)
    migrations_wait_s: float = Field(
        default=300.0,
        ge=0,
        description="How long `maniac gateway`, `worker` and `query` wait at start-up for "
        "ClickHouse and the broker to answer and for `maniac migrate` to have applied every "
        "migration they know.",
    )
    rate_limit_per_minute: int = Field(
        default=6_000, ge=0, description="Requests per minute per API key and process; 0: off."
    )
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class GatewaySettings(CommonSettings):
    providers_file: Path | None = Field(
        default=None,
        description="TOML file of upstream providers and containers; "
        "unset means schemas/providers.default.toml.",
    )
    upstream_max_connections: int = Field(default=1000, ge=1)
    telemetry_queue_size: int = Field(default=10_000, ge=1)
    telemetry_queue_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="Bytes of created completions' records held until the broker acknowledged "
        "them; beyond: dropped, counted.",
    )
    max_items_per_request: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_inflight_body_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="Request-body bytes held at once across requests; beyond: 503 Retry-After.",
    )
    project_budget_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of max_inflight_body_bytes one project may hold while another "
        "project is active (a project alone may hold all of it); beyond: 503 Retry-After. "
        "1: no share.",
    )
    max_messages_per_request: int = Field(
        default=10_000, ge=1, description="Most `messages` in one create request."
    )
    max_models_per_request: int = Field(
        default=10,
        ge=0,
        description="Most fallback `models` in one create request: each is an upstream call.",
    )
    body_read_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest a request body may take to arrive: then 400."
    )
    publish_timeout_s: float = Field(default=30.0, gt=0)
    producer_linger_ms: int = Field(default=5, ge=0)
    producer_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "zstd"


class WorkerSettings(CommonSettings):
    pricing_file: Path | None = Field(
        default=None,
        description="TOML price catalogue; unset means schemas/pricing.toml.",
    )
    consumer_group: str = "maniac-workers"
    batch_max_rows: int = Field(default=5_000, ge=1)
    batch_max_ms: int = Field(default=250, ge=1)
    batch_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Most bytes of records per ClickHouse insert (a batch is held twice, as "
        "records and as rows, and written while the next one is filled); a record larger than "
        "this makes a batch of its own. The consumer fetches at most this much at a time.",
    )
    fetch_max_records: int = Field(default=5_000, ge=1)
    worker_processes: int = Field(
        default=0,
        ge=0,
        description="Child processes that decode messages and build rows; 0: in the worker's "
        "own process.",
    )
    known_ids: bool = Field(
        default=True,
        description="Hold a hash of every stored completion (8 bytes each) so that new ones "
        "skip the stored-version lookup in ClickHouse; off: every id is looked up.",
    )
    metrics_port: int = Field(
        default=9100,
        ge=0,
        le=65535,
        description="`maniac worker`: the port of its Prometheus metrics (GET /metrics, on every "
        "address); 0: none. `maniac serve` serves them with its API.",
    )
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    insert_retry_initial_s: float = Field(default=0.2, gt=0)
    insert_retry_max_s: float = Field(default=10.0, gt=0)
    give_up_after_s: float = Field(
        default=300.0,
        gt=0,
        description="A batch that could not be stored for this long since the last fetch "
        "(ClickHouse or the broker down) is given up, uncommitted, and fetched again: the "
        "worker keeps fetching, so Kafka (max.poll.interval 600 s) does not drop it from its "
        "group while it still holds a batch it might write.",
    )


class QuerySettings(CommonSettings):
    pass


class ServeSettings(GatewaySettings, WorkerSettings, QuerySettings):
    """Everything in one process: `maniac serve`."""

    drain_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="At shutdown, how long to wait for the worker to store "
        "everything the gateway acknowledged.",
    )
    broker_storage: str = Field(
        default="memory://tansu/",
        description="Storage of the embedded broker: memory://tansu/ (fast, lost with the "
        "process) or s3://bucket/ (durable; S3 endpoint and credentials from AWS_* variables).",
    )
    broker_max_memory_mb: int = Field(
        default=256,
        ge=0,
        description="The embedded broker on memory storage keeps every record it is sent. "
        "When its resident memory passes this, publishing is held for a moment, everything "
        "acknowledged is stored, and the broker is started again, empty (its dead letters "
        "carried over). 0: never.",
    )
    max_backlog: int = Field(
        default=10_000,
        ge=0,
        description="Register requests wait while more acknowledged records than this are "
        "not yet stored: the gateway and the worker share the machine, and a gateway running "
        "ahead only builds a backlog (and delays visibility). 0: no limit.",
    )
    max_backlog_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Register requests wait as well while the acknowledged records not yet "
        "stored hold more bytes than this: records of megabytes (images inline) would "
        "otherwise pile up in the embedded broker's memory. 0: no limit.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
