-- Leasing a row rewrites it. With free space left on each page and no index that mentions
-- the lease columns, that rewrite is a HOT update: a new row version on the same page and no
-- index entries, instead of a new entry in every index of the table. The claim's
-- per-aggregate check probes the (aggregate_id, seq) unique index instead.
ALTER TABLE outbox SET (fillfactor = 70);
DROP INDEX outbox_blocking_idx;
