-- The transactional outbox.
--
-- `outbox` holds only events not yet published (pending) or given up on (dead), so the
-- relay's hot table stays small however much traffic passes through it. Publishing moves a
-- row to `outbox_published`, which is append-only and kept for the retention window so
-- events can be replayed; it is trimmed in bounded batches.

-- Per-aggregate sequence counter. Appending an event bumps this row inside the writer's
-- transaction, so concurrent writers to one aggregate serialise on its row lock and seqs are
-- contiguous in commit order (no `SELECT max(seq) + 1` race).
CREATE TABLE outbox_sequences (
    aggregate_id TEXT   NOT NULL CONSTRAINT outbox_sequences_pkey PRIMARY KEY,
    last_seq     BIGINT NOT NULL CONSTRAINT outbox_sequences_last_seq_positive CHECK (last_seq > 0)
);

CREATE TABLE outbox (
    id               BIGINT GENERATED ALWAYS AS IDENTITY CONSTRAINT outbox_pkey PRIMARY KEY,
    event_id         TEXT        NOT NULL CONSTRAINT outbox_event_id_unique UNIQUE,
    aggregate_type   TEXT        NOT NULL,
    aggregate_id     TEXT        NOT NULL,
    seq              BIGINT      NOT NULL CONSTRAINT outbox_seq_positive CHECK (seq > 0),
    event_type       TEXT        NOT NULL,
    payload          JSONB       NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    traceparent      TEXT,
    tracestate       TEXT,
    status           TEXT        NOT NULL DEFAULT 'pending' CONSTRAINT outbox_status_valid CHECK (status IN ('pending', 'dead')),
    attempts         INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error       TEXT,
    -- A claim is a lease: the claiming batch's token and an expiry on the database clock.
    lease_owner      UUID,
    lease_expires_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT outbox_aggregate_seq_unique UNIQUE (aggregate_id, seq)
);

-- Published events, kept for OUTBOX_RETENTION for replay.
CREATE TABLE outbox_published (
    id             BIGINT      NOT NULL CONSTRAINT outbox_published_pkey PRIMARY KEY,
    event_id       TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    seq            BIGINT      NOT NULL,
    event_type     TEXT        NOT NULL,
    payload        JSONB       NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    traceparent    TEXT,
    tracestate     TEXT,
    attempts       INTEGER     NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    published_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_published_published_at_idx ON outbox_published (published_at);
CREATE INDEX outbox_published_aggregate_idx ON outbox_published (aggregate_id, seq);
