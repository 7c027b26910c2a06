-- Keys expire after IDEMPOTENCY_KEY_TTL: the oldest are found and removed in bounded batches.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
