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
    "maniac_upstream_latency_seconds", "Upstream time to first byte, by provider.", ["provider"]
)
WORKER_ROWS = Counter("maniac_worker_rows_inserted_total", "Rows inserted into ClickHouse.")
WORKER_DEAD = Counter(
    "maniac_worker_dead_lettered_total", "Messages sent to the dead-letter topic."
)
WORKER_DUPLICATES = Counter(
    "maniac_worker_duplicates_skipped_total",
    "Completions not written again: re-delivered, or older than the stored version.",
)
WORKER_BATCH_ROWS = Histogram(
    "maniac_worker_batch_rows", "Rows per insert.", buckets=(1, 10, 100, 500, 1000, 5000, 20000)
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
CONSUMER_LAG = Gauge(
    "maniac_worker_consumer_lag",
    "Records in the partition not yet stored and committed (high watermark - committed).",
    ["topic", "partition"],
)
