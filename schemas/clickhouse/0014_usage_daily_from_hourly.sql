-- usage_daily from usage_hourly, not from every row of completions.
--
-- The two views of 0004 both read every inserted block of completions: each row was grouped
-- twice, its two quantile states built twice. A view on usage_hourly instead sees only what the
-- hourly view inserts there, a few rows per (project, hour, container, model, provider) of the
-- block, and adds them up by day: the sums are the same sums, and quantilesMergeState merges
-- the hourly states as the merges of usage_daily's own parts already did.
--
-- usage_hourly's only writer is its view (reads of it, and of usage_daily, are unchanged), so
-- everything that reaches the hourly table reaches the daily one. What usage_daily holds
-- already stays. As for 0008, no worker writes while this runs: a block inserted between the
-- new view's creation and the old one's drop would be counted twice in usage_daily.
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.usage_daily_from_hourly_mv
TO {database}.usage_daily AS
SELECT
    h.project AS project,
    toStartOfDay(h.bucket) AS bucket,
    h.container AS container,
    h.model AS model,
    h.provider AS provider,
    sum(h.requests) AS requests,
    sum(h.errors) AS errors,
    sum(h.unpriced) AS unpriced,
    sum(h.prompt_tokens) AS prompt_tokens,
    sum(h.completion_tokens) AS completion_tokens,
    sum(h.cached_tokens) AS cached_tokens,
    sum(h.reasoning_tokens) AS reasoning_tokens,
    sum(h.total_tokens) AS total_tokens,
    sum(h.spend) AS spend,
    quantilesMergeState(0.5, 0.9, 0.99)(h.latency_ms) AS latency_ms,
    quantilesMergeState(0.5, 0.9, 0.99)(h.ttft_ms) AS ttft_ms
FROM {database}.usage_hourly AS h
GROUP BY project, bucket, container, model, provider;

DROP VIEW IF EXISTS {database}.usage_daily_mv;
