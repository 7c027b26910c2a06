-- Failures of entries that were never settled here afterwards (gone from the stream, or applied
-- by another replica on a first delivery) are removed once older than DEDUPE_RETENTION, in
-- bounded batches found by their last failure.
CREATE INDEX entry_failures_last_failed_at ON entry_failures (last_failed_at);
