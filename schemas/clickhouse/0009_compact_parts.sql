-- Parts of up to 256 MiB (uncompressed) are written in the Compact format: all columns in one
-- file, instead of a pair of files per column (and per Nullable, Array and LowCardinality
-- substream). A batch of 5,000 completions is about 15 MiB, over the 10 MiB default, so every
-- insert and every early merge of `completions` wrote a Wide part of over a hundred files. On an
-- ext4 file system without a journal (where chDB's directory usually is), creating a file scans
-- for inodes that were not deleted recently, and merges delete parts all the time: creating
-- those files took about a third of the CPU of an insert. Larger parts, which merges produce
-- rarely, are still Wide, so reads of a few columns of many rows are unchanged. Only parts
-- written from now on are affected.
ALTER TABLE {database}.completions
    MODIFY SETTING min_bytes_for_wide_part = 268435456;

ALTER TABLE {database}.completion_responses
    MODIFY SETTING min_bytes_for_wide_part = 268435456;
