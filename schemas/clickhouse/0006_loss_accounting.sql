-- Loss accounting: what never reached maniac.completions, per project.
--
-- dead_letters: one row per message a worker sent to the dead-letter topic, identified by where
-- it came from (source topic, partition, offset), so a dead letter written again after a
-- redelivery is counted once. project and completion_id come from the message key
-- (project/completion_id), known even when the value is garbage. `maniac dlq replay` writes a
-- newer version of the row with replayed_at set (the version column: 0 means not replayed).
CREATE TABLE IF NOT EXISTS {database}.dead_letters
(
    project          LowCardinality(String),
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    completion_id    String,
    message_key      String,
    reason           String,
    dead_at          DateTime64(3, 'UTC'),
    replayed_at      DateTime64(3, 'UTC') DEFAULT 0,
    payload          String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(replayed_at)
ORDER BY (project, source_topic, source_partition, source_offset);

-- dropped: created completions served to a client whose record the gateway could not publish
-- (broker down, queue full, shutdown). Written best-effort by the gateway; the Prometheus counter
-- maniac_project_records_dropped_total is the record of last resort.
CREATE TABLE IF NOT EXISTS {database}.dropped
(
    project       LowCardinality(String),
    completion_id String,
    reason        LowCardinality(String),
    error         String,
    dropped_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (project, completion_id);
