-- A dead letter's identity was (topic, partition, offset): one record only for the life of a log.
-- The embedded broker on memory storage numbers every partition from 0 again each time it starts,
-- so a new dead letter at an offset an earlier one had taken replaced that one's row, or, if that
-- one had been replayed, counted as replayed and was never replayed itself.
--
-- The source record's Kafka timestamp (milliseconds, set when it was produced) joins the
-- identity: a redelivery of one record carries the same timestamp, two records of different
-- lives of a log do not. Rows written before, and dead-letter records without a
-- `source_timestamp` header (written by an earlier worker), have 0, so they keep matching each
-- other. The column is added at the end of the sorting key in the same statement: existing parts
-- keep their order and nothing is rewritten.
ALTER TABLE {database}.dead_letters
    ADD COLUMN source_timestamp Int64 AFTER source_offset,
    MODIFY ORDER BY (project, source_topic, source_partition, source_offset, source_timestamp);
