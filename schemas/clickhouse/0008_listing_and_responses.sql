-- The list's index: one narrow row per stored version of a completion, in page order
-- (project, created, completion_id), so a page is read in key order and stops after it, with no
-- FINAL merge and no sort of the project's rows.
--
-- sign is the row's agg_sign: +1 for a stored version, -1 for its retraction (see 0004: the
-- worker writes a retraction, an exact copy of the stored version, in the same insert as the
-- new version, and never stores the same version twice). A version and its retraction carry
-- the same project, created, completion_id, model and container, so they cancel: summed per
-- (created, completion_id) under any filter on model and container, the newest version counts
-- 1 and every replaced one 0, and sum(sign) is the number of completions that match.
--
-- SummingMergeTree nets the signs of equal keys within an insert and when parts merge, and
-- drops keys that net to 0 (whatever the order of the rows); model and container are in the key so that
-- versions differing only in them are never merged into one row. Reads never rely on merges:
-- they sum sign themselves.
CREATE TABLE IF NOT EXISTS {database}.completion_listing
(
    project       LowCardinality(String),
    created       DateTime64(3, 'UTC'),
    completion_id String,
    model         LowCardinality(String),
    container     LowCardinality(String),
    sign          Int8
)
ENGINE = SummingMergeTree(sign)
ORDER BY (project, created, completion_id, model, container);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_listing_mv
TO {database}.completion_listing AS
SELECT project, created, completion_id, model, container, agg_sign AS sign
FROM {database}.completions;

-- What is already stored: the current version of each completion (what FINAL reads), once.
-- Later retractions are copies of exactly these rows, so they cancel them. This assumes no
-- worker writes while the migration runs (`maniac serve` and the compose file migrate before
-- any worker starts): a row inserted between the view's creation and this read would be
-- counted twice.
INSERT INTO {database}.completion_listing
SELECT project, created, completion_id, model, container, toInt8(1) AS sign
FROM {database}.completions FINAL;

-- Stored responses for point reads, replacing completion_bodies (0007) with granules of 32 rows
-- and compressed blocks of 16-64 KB: reading one response decompresses about 50 KB instead of
-- a 256-row granule (about 350 KB), which made the 20 bodies of a page the largest part of a
-- list. index_granularity cannot be changed on an existing table, hence a new one. Filled at
-- insert time by the view below (stored versions only, never retractions), and from what is
-- already stored by the backfill; then 0007's view and table are dropped.
CREATE TABLE IF NOT EXISTS {database}.completion_responses
(
    project       LowCardinality(String),
    completion_id String,
    received_at   DateTime64(3, 'UTC'),
    response      String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (project, completion_id)
SETTINGS index_granularity = 32, min_compress_block_size = 16384, max_compress_block_size = 65536;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_responses_mv
TO {database}.completion_responses AS
SELECT project, completion_id, received_at, response
FROM {database}.completions
WHERE agg_sign = 1;

INSERT INTO {database}.completion_responses
SELECT project, completion_id, received_at, response
FROM {database}.completions
WHERE agg_sign = 1;

DROP VIEW IF EXISTS {database}.completion_bodies_mv;

DROP TABLE IF EXISTS {database}.completion_bodies;
