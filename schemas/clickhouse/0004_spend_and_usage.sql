-- Spend provenance, usage provenance, and usage aggregates maintained at insert time.
--
-- agg_sign: +1 for a stored completion; -1 for a retraction, a copy of the previous version of a
-- completion that was registered again with other values. The worker writes the retraction and
-- the new version in the same insert, and never writes a completion it already stored with the
-- same version (a re-delivery), so the aggregates below count each completion once. Reads of
-- this table use FINAL, which always picks the newest version (never a retraction).
ALTER TABLE {database}.completions
    ADD COLUMN IF NOT EXISTS agg_sign Int8 DEFAULT 1,
    ADD COLUMN IF NOT EXISTS spend_source LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS price_version LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS spend_input Decimal(38, 12) DEFAULT 0,
    ADD COLUMN IF NOT EXISTS spend_cache_read Decimal(38, 12) DEFAULT 0,
    ADD COLUMN IF NOT EXISTS spend_cache_write Decimal(38, 12) DEFAULT 0,
    ADD COLUMN IF NOT EXISTS spend_reasoning Decimal(38, 12) DEFAULT 0,
    ADD COLUMN IF NOT EXISTS spend_output Decimal(38, 12) DEFAULT 0,
    ADD COLUMN IF NOT EXISTS usage_source LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS usage_flags Array(LowCardinality(String));

CREATE TABLE IF NOT EXISTS {database}.usage_hourly
(
    project           LowCardinality(String),
    bucket            DateTime('UTC'),
    container         LowCardinality(String),
    model             LowCardinality(String),
    provider          LowCardinality(String),
    requests          SimpleAggregateFunction(sum, Int64),
    errors            SimpleAggregateFunction(sum, Int64),
    unpriced          SimpleAggregateFunction(sum, Int64),
    prompt_tokens     SimpleAggregateFunction(sum, Int64),
    completion_tokens SimpleAggregateFunction(sum, Int64),
    cached_tokens     SimpleAggregateFunction(sum, Int64),
    reasoning_tokens  SimpleAggregateFunction(sum, Int64),
    total_tokens      SimpleAggregateFunction(sum, Int64),
    spend             SimpleAggregateFunction(sum, Decimal(38, 12)),
    latency_ms        AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32),
    ttft_ms           AggregateFunction(quantiles(0.5, 0.9, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (project, bucket, container, model, provider);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.usage_hourly_mv TO {database}.usage_hourly AS
SELECT
    project,
    toStartOfHour(c.created) AS bucket,
    container,
    model,
    provider,
    toInt64(sum(agg_sign)) AS requests,
    toInt64(sumIf(agg_sign, status = 'error')) AS errors,
    toInt64(sumIf(c.agg_sign, c.spend IS NULL)) AS unpriced,
    toInt64(sum(agg_sign * toInt64(c.prompt_tokens))) AS prompt_tokens,
    toInt64(sum(agg_sign * toInt64(c.completion_tokens))) AS completion_tokens,
    toInt64(sum(agg_sign * toInt64(c.cached_tokens))) AS cached_tokens,
    toInt64(sum(agg_sign * toInt64(c.reasoning_tokens))) AS reasoning_tokens,
    toInt64(sum(agg_sign * toInt64(c.total_tokens))) AS total_tokens,
    toDecimal128(sum(ifNull(c.spend, toDecimal128(0, 12)) * c.agg_sign), 12) AS spend,
    quantilesStateIf(0.5, 0.9, 0.99)(toFloat32(ifNull(c.latency_ms, 0)), c.agg_sign = 1 AND c.latency_ms IS NOT NULL) AS latency_ms,
    quantilesStateIf(0.5, 0.9, 0.99)(toFloat32(ifNull(c.ttft_ms, 0)), c.agg_sign = 1 AND c.ttft_ms IS NOT NULL) AS ttft_ms
FROM {database}.completions AS c
GROUP BY project, bucket, container, model, provider;

CREATE TABLE IF NOT EXISTS {database}.usage_daily AS {database}.usage_hourly
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (project, bucket, container, model, provider);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.usage_daily_mv TO {database}.usage_daily AS
SELECT
    project,
    toDateTime(toStartOfDay(c.created), 'UTC') AS bucket,
    container,
    model,
    provider,
    toInt64(sum(agg_sign)) AS requests,
    toInt64(sumIf(agg_sign, status = 'error')) AS errors,
    toInt64(sumIf(c.agg_sign, c.spend IS NULL)) AS unpriced,
    toInt64(sum(agg_sign * toInt64(c.prompt_tokens))) AS prompt_tokens,
    toInt64(sum(agg_sign * toInt64(c.completion_tokens))) AS completion_tokens,
    toInt64(sum(agg_sign * toInt64(c.cached_tokens))) AS cached_tokens,
    toInt64(sum(agg_sign * toInt64(c.reasoning_tokens))) AS reasoning_tokens,
    toInt64(sum(agg_sign * toInt64(c.total_tokens))) AS total_tokens,
    toDecimal128(sum(ifNull(c.spend, toDecimal128(0, 12)) * c.agg_sign), 12) AS spend,
    quantilesStateIf(0.5, 0.9, 0.99)(toFloat32(ifNull(c.latency_ms, 0)), c.agg_sign = 1 AND c.latency_ms IS NOT NULL) AS latency_ms,
    quantilesStateIf(0.5, 0.9, 0.99)(toFloat32(ifNull(c.ttft_ms, 0)), c.agg_sign = 1 AND c.ttft_ms IS NOT NULL) AS ttft_ms
FROM {database}.completions AS c
GROUP BY project, bucket, container, model, provider;
