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
-- SummingMergeTree nets the signs of equal keys when parts merge and drops keys that net to 0
-- (whatever the order of the rows in the merge); model and container are in the key so that
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
-- Later retractions are copies of exactly these rows, so they cancel them.
INSERT INTO {database}.completion_listing
SELECT project, created, completion_id, model, container, toInt8(1) AS sign
FROM {database}.completions FINAL;
