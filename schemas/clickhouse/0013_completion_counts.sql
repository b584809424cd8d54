-- The list's total, per (project, model, container), so that counting what a list matches no
-- longer reads every row of the project in `completion_listing` (about 10 ms of ClickHouse CPU
-- per list at 1,000,000 completions in a project, 100 ms at 10,000,000).
--
-- completions: the sum of `agg_sign` (the sum of `sign` in `completion_listing`: +1 for a stored
-- version, -1 for its retraction, which has the same model and container), so summed under any
-- filter on model and container it is the number of completions that match, as before.
-- rows: the rows written to `completion_listing`, retractions included. Merges of the listing
-- only remove rows, so it bounds how many rows a page can ever have to read.
--
-- SummingMergeTree adds up rows of equal keys when parts merge; reads never rely on that: they
-- sum themselves. The view is one more on `completions`, beside the listing's: both take the
-- same inserted block, one after the other, so for the few milliseconds between them a total
-- may count a completion its page does not show yet (or not count one it shows), as a total
-- read a moment earlier or later would.
CREATE TABLE IF NOT EXISTS {database}.completion_counts
(
    project     LowCardinality(String),
    model       LowCardinality(String),
    container   LowCardinality(String),
    completions Int64,
    rows        UInt64
)
ENGINE = SummingMergeTree((completions, rows))
ORDER BY (project, model, container);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.completion_counts_mv
TO {database}.completion_counts AS
SELECT project, model, container, toInt64(sum(agg_sign)) AS completions, count() AS rows
FROM {database}.completions
GROUP BY project, model, container;

-- What is already stored, from the listing itself: exactly the total and the row count the list
-- computed from it until now. As for 0008, no worker writes while this runs (`maniac serve` and
-- the compose file migrate before any worker starts): a row stored between the view's creation
-- and this read would be counted twice.
INSERT INTO {database}.completion_counts
SELECT project, model, container, toInt64(sum(sign)) AS completions, count() AS rows
FROM {database}.completion_listing
GROUP BY project, model, container;
