-- API keys, stored only as salted SHA-256 hashes. key_id is a short non-secret lookup index
-- derived from the key; revocation writes a newer version of the row.
CREATE TABLE IF NOT EXISTS {database}.api_keys
(
    key_id      String,
    project     String,
    salt        String,
    key_hash    String,
    created_at  DateTime64(3, 'UTC'),
    revoked     UInt8 DEFAULT 0,
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (key_id, key_hash);
