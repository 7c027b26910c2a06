-- Stock can never be promised beyond what is on hand: reservations only grow within
-- `available`, and setting stock below what is reserved is refused (HTTP 422).
ALTER TABLE inventory
    ADD CONSTRAINT inventory_reserved_within_on_hand CHECK (reserved <= on_hand);

-- What inventory did for each order: the items are kept so that confirm/cancel (which carry
-- only the order id) know which quantities to move.
CREATE TABLE order_reservations (
    order_id   TEXT        NOT NULL CONSTRAINT order_reservations_pkey PRIMARY KEY,
    status     TEXT        NOT NULL CONSTRAINT order_reservations_status_known
                               CHECK (status IN ('RESERVED', 'REJECTED', 'CONFIRMED', 'CANCELLED')),
    -- [{"sku": "SKU-1", "quantity": 2}, ...], quantities summed per sku.
    items      JSONB       NOT NULL,
    reason     TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Events that arrived before their predecessor (seq > last_seq + 1). They are acknowledged
-- on the stream and applied, in seq order, by whichever transaction fills the gap.
CREATE TABLE parked_events (
    aggregate_id    TEXT        NOT NULL,
    seq             BIGINT      NOT NULL,
    event_id        TEXT        NOT NULL,
    stream_entry_id TEXT        NOT NULL,
    -- The entry's fields exactly as read: [[name, value], ...].
    fields          JSONB       NOT NULL,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT parked_events_pkey PRIMARY KEY (aggregate_id, seq)
);

-- Entries that could not be applied; also written to the `<stream>.dlq` stream.
CREATE TABLE dead_letters (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY CONSTRAINT dead_letters_pkey PRIMARY KEY,
    stream_entry_id TEXT        NOT NULL,
    event_id        TEXT,
    aggregate_id    TEXT,
    reason          TEXT        NOT NULL,
    fields          JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    redriven_at     TIMESTAMPTZ,
    -- A redelivered poison entry is recorded once.
    CONSTRAINT dead_letters_stream_entry_unique UNIQUE (stream_entry_id)
);
