-- Input tokens written to the provider's prompt cache (Anthropic's cache_creation_input_tokens,
-- or prompt_tokens_details.cache_write_tokens), charged at the cache-write price.
ALTER TABLE {database}.completions
    ADD COLUMN IF NOT EXISTS cache_write_tokens UInt64 DEFAULT 0;
