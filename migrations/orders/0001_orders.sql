-- Orders and the idempotency record of the requests that created them.
CREATE TABLE orders (
    id          TEXT        NOT NULL CONSTRAINT orders_pkey PRIMARY KEY,
    customer_id TEXT        NOT NULL,
    status      TEXT        NOT NULL CONSTRAINT orders_status_valid CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    items       JSONB       NOT NULL,
    total_cents BIGINT      NOT NULL CONSTRAINT orders_total_not_negative CHECK (total_cents >= 0),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- One row per Idempotency-Key: a retry with the same key and body gets the stored response.
-- The key row is inserted before its order (so concurrent requests with one key queue on the
-- primary key), hence the foreign key is checked at commit.
CREATE TABLE idempotency_keys (
    key           TEXT        NOT NULL CONSTRAINT idempotency_keys_pkey PRIMARY KEY,
    request_hash  TEXT        NOT NULL,
    order_id      TEXT        NOT NULL CONSTRAINT idempotency_keys_order_fkey REFERENCES orders (id) DEFERRABLE INITIALLY DEFERRED,
    response_body JSONB       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
