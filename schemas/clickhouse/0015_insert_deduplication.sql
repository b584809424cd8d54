-- Inserts of the worker that are retried count once.
--
-- The worker inserts each batch into completions_in (Null), and views carry its rows on into
-- completions and completion_responses, and from completions into completion_listing,
-- completion_counts and usage_hourly, and from there into usage_daily. Those writes are not one
-- transaction: when a later one fails (a view's memory limit, a table away), or the insert
-- succeeds but its answer never reaches the worker (a timeout, a connection reset on a
-- ClickHouse server), the tables written first keep the rows and the retry writes them there
-- again: a completion listed, counted and charged twice in the aggregates.
--
-- Each insert now carries a deduplication token (a hash of its body) and asks every view's
-- table to deduplicate (`deduplicate_blocks_in_dependent_materialized_views`). A table keeps
-- the tokens of its last 10,000 blocks, and drops a block whose token it already holds: a retry
-- writes only where the first attempt did not. A different insert, however alike its blocks
-- (two batches of one completion each make the same block of completion_counts), has another
-- token and is kept. Only inserts from now on are affected.
ALTER TABLE {database}.completions
    MODIFY SETTING non_replicated_deduplication_window = 10000;

ALTER TABLE {database}.completion_responses
    MODIFY SETTING non_replicated_deduplication_window = 10000;

ALTER TABLE {database}.completion_listing
    MODIFY SETTING non_replicated_deduplication_window = 10000;

ALTER TABLE {database}.completion_counts
    MODIFY SETTING non_replicated_deduplication_window = 10000;

ALTER TABLE {database}.usage_hourly
    MODIFY SETTING non_replicated_deduplication_window = 10000;

ALTER TABLE {database}.usage_daily
    MODIFY SETTING non_replicated_deduplication_window = 10000;
