-- Stored responses for point reads. `completions` keeps its wide rows in granules of thousands
-- (its index_granularity_bytes cannot be changed on an existing table), so reading the 20
-- responses of a page decompressed 20 such granules. Here a granule is 256 rows: list picks the
-- page's ids in `completions` FINAL, then reads just those bodies by primary key; get reads one.
-- Filled at insert time by the view below (stored versions only, never retractions), and from
-- what is already stored by the backfill at the end.
CREATE TABLE IF NOT EXISTS {database}.completion_bodies
(
    project       LowCardinality(String),
    completion_id String,
    received_at   DateTime64(3, 'UTC'),
    response      String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (project, completion_id)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_bodies_mv
TO {database}.completion_bodies AS
SELECT project, completion_id, received_at, response
FROM {database}.completions
WHERE agg_sign = 1;

INSERT INTO {database}.completion_bodies
SELECT project, completion_id, received_at, response
FROM {database}.completions
WHERE agg_sign = 1;
