-- The outbox's write, for other tables' owners, and orders numbering their own events.
--
-- A statement that changes an owner's rows ends with `outbox_append(event, seq)`, so the change
-- and its event commit together in one statement, and no SQL outside the outbox's names its
-- tables. `seq` is the event's number within its aggregate, given by the aggregate's owner from
-- its own row (a version kept under that row's lock: 1, 2, 3 … without gaps in commit order),
-- or NULL to have the outbox count: its `outbox_counters` row is bumped, and that row's lock
-- orders concurrent writers. An aggregate is numbered one way or the other, never both. With
-- `notify`, the relays are woken at commit (the payload is the row's id).
--
-- Orders number their events from now on: `orders.version` is the seq of an order's latest
-- event, continued from the outbox's counter for orders written before. The counter table is
-- renamed in the same transaction, so an order-service from before this migration fails to
-- write (its statements name `outbox_sequences`) instead of numbering an event twice.
--
-- The backfill rewrites every order that has had a transition, holding the `orders` table
-- locked meanwhile (14 s for a million orders, 600 000 of them with transitions, on a 2-core
-- machine): the services' 10 s statement timeout would cut it short, so the migration runs
-- without one.

SET LOCAL statement_timeout = 0;

ALTER TABLE orders ADD COLUMN version BIGINT NOT NULL DEFAULT 1
    CONSTRAINT orders_version_positive CHECK (version > 0);
UPDATE orders SET version = counted.last_seq
    FROM outbox_sequences counted
    WHERE counted.aggregate_id = orders.id AND counted.last_seq > 1;
DELETE FROM outbox_sequences counted USING orders WHERE counted.aggregate_id = orders.id;

ALTER TABLE outbox_sequences RENAME TO outbox_counters;
ALTER TABLE outbox_counters RENAME CONSTRAINT outbox_sequences_pkey TO outbox_counters_pkey;
ALTER TABLE outbox_counters RENAME CONSTRAINT outbox_sequences_last_seq_positive TO outbox_counters_last_seq_positive;

CREATE TYPE outbox_new_event AS (
    event_id       TEXT,
    aggregate_type TEXT,
    aggregate_id   TEXT,
    event_type     TEXT,
    payload        TEXT,
    occurred_at    TIMESTAMPTZ,
    traceparent    TEXT,
    tracestate     TEXT,
    notify         BOOLEAN
);

CREATE FUNCTION outbox_append(event outbox_new_event, seq BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    appended_id BIGINT;
BEGIN
    IF seq IS NULL THEN
        INSERT INTO outbox_counters (aggregate_id, last_seq) VALUES (event.aggregate_id, 1)
            ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_counters.last_seq + 1
            RETURNING last_seq INTO seq;
    END IF;
    INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at,
                        traceparent, tracestate)
        VALUES (event.event_id, event.aggregate_type, event.aggregate_id, seq, event.event_type,
                event.payload::jsonb, event.occurred_at, event.traceparent, event.tracestate)
        RETURNING id INTO appended_id;
    -- The relays' channel, `outbox::CHANNEL`.
    IF event.notify THEN
        PERFORM pg_notify('outbox_events', appended_id::text);
    END IF;
    RETURN seq;
END
$$;
