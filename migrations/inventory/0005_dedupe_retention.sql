-- DEDUPE_RETENTION. A checkpoint remembers the latest `occurred_at` of its order's applied
-- events and whether one of them closed the order (a cancellation: no event can follow). A
-- closed order's checkpoint and reservation go once that time is older than the retention;
-- events older than the retention are never applied, so none of that order's can apply again.
ALTER TABLE aggregate_checkpoints
    ADD COLUMN last_occurred_at TIMESTAMPTZ,
    ADD COLUMN closed BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX aggregate_checkpoints_closed ON aggregate_checkpoints (last_occurred_at) WHERE closed;
-- Dedupe rows go after the retention, oldest first.
CREATE INDEX processed_messages_processed_at ON processed_messages (processed_at);
