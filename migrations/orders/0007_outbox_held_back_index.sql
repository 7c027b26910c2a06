-- The rows that hold their order's later rows back: backing off after a failed attempt, or
-- dead. They are few, so this index is tiny, and the claim's check "no earlier row of this
-- order is held back" is a probe into it rather than into the (aggregate_id, seq) index of
-- the whole outbox, and so is the relay's lookup of the next backing-off row that falls due.
CREATE INDEX outbox_held_back_idx ON outbox (aggregate_id, seq) WHERE status <> 'pending' OR attempts > 0;
