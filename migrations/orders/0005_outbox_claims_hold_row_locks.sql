-- A claim is now the transaction that holds its rows' locks while the batch is published, and
-- publishing commits the move to outbox_published in that same transaction. Rows are no longer
-- rewritten to lease them, so the lease columns go, and pages no longer need room for new row
-- versions (failed attempts, the only updates left, are rare).
ALTER TABLE outbox DROP COLUMN lease_owner, DROP COLUMN lease_expires_at;
ALTER TABLE outbox SET (fillfactor = 100);
