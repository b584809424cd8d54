"""Prometheus metrics, defined once. Every service exposes them at ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REGISTER_ITEMS = Counter("maniac_register_items_total", "Register items by outcome.", ["outcome"])
TELEMETRY_DROPPED = Counter(
    "maniac_telemetry_dropped_total",
    "Completions served to a client but not recorded, by reason.",
    ["reason"],
)
TELEMETRY_PUBLISHED = Counter(
    "maniac_telemetry_published_total", "Completion records acknowledged by the broker."
)
UPSTREAM_ATTEMPTS = Counter(
    "maniac_upstream_attempts_total",
    "Upstream attempts by provider and outcome.",
    ["provider", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "maniac_upstream_latency_seconds",
    "Upstream response time by provider: to the whole body, or to a stream's headers.",
    ["provider"],
)
WORKER_ROWS = Counter("maniac_worker_rows_inserted_total", "Rows inserted into ClickHouse.")
WORKER_DEAD = Counter(
    "maniac_worker_dead_lettered_total", "Messages sent to the dead-letter topic."
)
WORKER_GIVEN_UP = Counter(
    "maniac_worker_batches_given_up_total",
    "Batches given up before they were stored, uncommitted, to be fetched again: their "
    "partitions were revoked, or they could not be stored for too long.",
    ["reason"],
)
WORKER_DUPLICATES = Counter(
    "maniac_worker_duplicates_skipped_total",
    "Completions not written again: re-delivered, or older than the stored version.",
)
WORKER_BATCH_ROWS = Histogram(
    "maniac_worker_batch_rows", "Rows per insert.", buckets=(1, 10, 100, 500, 1000, 5000, 20000)
)
WORKER_DEDUP_IDS = Counter(
    "maniac_worker_dedup_ids_total",
    "Completions whose stored version the worker looked up: answered by its set of known "
    "ids (certainly not stored), or asked of ClickHouse.",
    ["answered_by"],
)
WORKER_INSERT_SECONDS = Histogram("maniac_worker_insert_seconds", "Time of one bulk insert.")
WORKER_RETRIES = Counter(
    "maniac_worker_retries_total", "Transient failures retried by the worker.", ["what"]
)
HTTP_REQUESTS = Counter(
    "maniac_http_requests_total",
    "HTTP requests by route and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "maniac_http_request_seconds", "Time to the first byte of the response, by route.", ["route"]
)
BROKER_RESTARTS = Counter(
    "maniac_broker_restarts_total",
    "Times `maniac serve` started its embedded broker again: to give back its memory "
    "(memory), or after it died (exited).",
    ["reason"],
)
WORKER_FAILURES = Counter(
    "maniac_worker_failures_total",
    "Times the worker of `maniac serve` stopped on an error; it is started again, from the "
    "committed offsets.",
)
CONSUMER_LAG = Gauge(
    "maniac_worker_consumer_lag",
    "Records in the partition not yet stored (high watermark - where storing reached).",
    ["topic", "partition"],
)

# -- loss accounting, per project ---------------------------------------------------------------
# Labelled by project only (never completion ids or free-text reasons): one series per project.
PROJECT_ACKNOWLEDGED = Counter(
    "maniac_project_records_acknowledged_total",
    "Records the broker acknowledged to the gateway (register and created), by project.",
    ["project"],
)
PROJECT_DROPPED = Counter(
    "maniac_project_records_dropped_total",
    "Created completions served but not recorded, by project and reason.",
    ["project", "reason"],
)
PROJECT_STORED = Counter(
    "maniac_project_records_stored_total",
    "Completions inserted into ClickHouse by the workers, by project.",
    ["project"],
)
PROJECT_DUPLICATES = Counter(
    "maniac_project_records_duplicate_total",
    "Completions not written again (re-delivered or older than stored), by project.",
    ["project"],
)
PROJECT_DEAD = Counter(
    "maniac_project_records_dead_lettered_total",
    "Messages sent to the dead-letter topic, by the project in their key ('unknown': no key).",
    ["project"],
)
INGESTION_LAG = Histogram(
    "maniac_ingestion_lag_seconds",
    "From the gateway's receipt (acknowledged) to the row inserted in ClickHouse, by project.",
    ["project"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
)
DROPS_UNRECORDED = Counter(
    "maniac_gateway_drop_records_unwritten_total",
    "Drop records the gateway gave up writing to ClickHouse (its buffer was full); the "
    "drops themselves are still counted in maniac_project_records_dropped_total.",
)


def project_label(project: str) -> str:
    """The project as a metric label: bounded in length, never empty."""
    return project[:64] or "unknown"


WORKER_KNOWN_IDS_BYTES = Gauge(
    "maniac_worker_known_ids_bytes",
    "Memory of the worker's set of known completion ids (8 bytes per stored completion of "
    "its partitions; 0 while it is not loaded).",
)
GATEWAY_BODY_BYTES = Gauge(
    "maniac_gateway_inflight_body_bytes", "Request-body bytes the gateway holds right now."
)
GATEWAY_OVERLOADED = Counter(
    "maniac_gateway_overloaded_total",
    "Requests refused (503) because the in-flight body budget was full.",
)
