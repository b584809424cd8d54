-- Every response is stored once, in `completion_responses`, instead of twice. Since 0007 the
-- response was written to `completions` and copied by a view into the table list and get read
-- from. The copy in `completions` was read by nothing, yet it was about 200 of the 340 bytes a
-- row takes there, and compressing and merging it cost ClickHouse 8-9 us of CPU per stored row.
--
-- Writers now insert into `completions_in`, a table with the Null engine (it keeps nothing)
-- and the columns of `completions`. Two views take each inserted block: one into
-- `completion_responses` (stored versions only, as before), one into `completions` with an
-- empty `response`; the listing and usage views of `completions` follow from there. Rows
-- stored before keep their response in `completions` too: nothing is rewritten.
--
-- A worker of an earlier release may still write into `completions` itself while this runs (a
-- rolling deploy). Its responses keep reaching `completion_responses` through the view on
-- `completions` below, which copies only non-empty ones (those of `completions_in` are empty
-- there); it is created before the old view is dropped, so no insert is missed in between
-- (one that both views copy is the same version twice, which the table keeps once).
--
-- A column added to `completions` later must be added to `completions_in` too, and
-- `completions_in_mv` created again (`SELECT *` is expanded when a view is created).
CREATE TABLE IF NOT EXISTS {database}.completions_in AS {database}.completions
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_responses_in_mv
TO {database}.completion_responses AS
SELECT project, completion_id, received_at, response
FROM {database}.completions_in
WHERE agg_sign = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completions_in_mv
TO {database}.completions AS
SELECT * REPLACE ('' AS response)
FROM {database}.completions_in;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_responses_direct_mv
TO {database}.completion_responses AS
SELECT project, completion_id, received_at, response
FROM {database}.completions
WHERE agg_sign = 1 AND response != '';

DROP VIEW IF EXISTS {database}.completion_responses_mv;
