-- Every published event is inserted into outbox_published in the relay's claim, so each index
-- there costs on every event (about a fifth of the relay's throughput for these two). Rows
-- arrive in publish order and are never updated, so a BRIN index on published_at (a few pages,
-- touched once per page range) serves retention; replay by aggregate, a rare manual command,
-- scans the retained rows instead of keeping a B-tree for it.
DROP INDEX outbox_published_published_at_idx;
DROP INDEX outbox_published_aggregate_idx;
CREATE INDEX outbox_published_published_at_brin ON outbox_published USING brin (published_at);
