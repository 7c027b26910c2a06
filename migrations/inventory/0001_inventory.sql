-- Stock per SKU.
CREATE TABLE inventory (
    sku        TEXT        NOT NULL CONSTRAINT inventory_pkey PRIMARY KEY,
    on_hand    BIGINT      NOT NULL CONSTRAINT inventory_on_hand_not_negative CHECK (on_hand >= 0),
    reserved   BIGINT      NOT NULL DEFAULT 0 CONSTRAINT inventory_reserved_not_negative CHECK (reserved >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per applied (or deliberately skipped) event: the dedupe record.
CREATE TABLE processed_messages (
    event_id     TEXT        NOT NULL CONSTRAINT processed_messages_pkey PRIMARY KEY,
    aggregate_id TEXT        NOT NULL,
    seq          BIGINT      NOT NULL,
    event_type   TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The last applied seq of each order: events apply strictly in seq order.
CREATE TABLE aggregate_checkpoints (
    aggregate_id TEXT        NOT NULL CONSTRAINT aggregate_checkpoints_pkey PRIMARY KEY,
    last_seq     BIGINT      NOT NULL CONSTRAINT aggregate_checkpoints_last_seq_not_negative CHECK (last_seq >= 0),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
