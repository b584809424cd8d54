-- Created completions: one logical operation (one row) made of one or more upstream attempts.
-- status: ok | partial (stream cut short) | error (every attempt failed); '' for registered.
ALTER TABLE {database}.completions
    ADD COLUMN IF NOT EXISTS operation_id String DEFAULT '',
    ADD COLUMN IF NOT EXISTS status LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS stream UInt8 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS ttft_ms Nullable(Float32),
    ADD COLUMN IF NOT EXISTS latency_ms Nullable(Float32),
    ADD COLUMN IF NOT EXISTS attempts String DEFAULT '' CODEC(ZSTD(3));
