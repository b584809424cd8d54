-- One row per recorded completion. ReplacingMergeTree on (project, completion_id): a completion
-- delivered twice or registered twice collapses to one row (the newest received_at wins), and
-- every read uses FINAL so duplicates are never visible before a merge.
-- Lookups by id hit the primary key; list queries are bounded by the project prefix and use the
-- skip indexes on created, model and container.
CREATE TABLE IF NOT EXISTS {database}.completions
(
    project           LowCardinality(String),
    completion_id     String,
    created           DateTime64(3, 'UTC'),
    received_at       DateTime64(3, 'UTC'),
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3),
    kind              LowCardinality(String),
    model             LowCardinality(String),
    provider          LowCardinality(String),
    container         LowCardinality(String),
    model_id          String,
    finish_reason     LowCardinality(String),
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    total_tokens      UInt64,
    cached_tokens     UInt64,
    reasoning_tokens  UInt64,
    spend             Nullable(Decimal(38, 12)),
    tags              Array(LowCardinality(String)),
    trace_id          String,
    response          String CODEC(ZSTD(3)),
    request           String CODEC(ZSTD(3)),
    INDEX idx_created created TYPE minmax GRANULARITY 1,
    INDEX idx_model model TYPE set(1024) GRANULARITY 4,
    INDEX idx_container container TYPE set(1024) GRANULARITY 4,
    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (project, completion_id);
