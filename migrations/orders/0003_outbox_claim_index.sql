-- Rows that may keep an aggregate's later rows from being claimed: dead, leased (possibly
-- expired) or backing off after a failed attempt. Rows never attempted and not leased are
-- always claimable, so the claim's per-aggregate check only needs this small index instead
-- of scanning the outbox.
CREATE INDEX outbox_blocking_idx ON outbox (aggregate_id, seq)
    WHERE status = 'dead' OR lease_owner IS NOT NULL OR attempts > 0;
