-- Every change of a stock row (a `PUT`, a reservation, a confirmation, a release) bumps its
-- version; `PUT /inventory/{sku}` with `If-Match: "<version>"` refuses a write based on an
-- older read (412) instead of overwriting what changed since.
ALTER TABLE inventory ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- Failures of stream entries that are the entries' own (the database refused what they carry),
-- counted across replicas and restarts: an entry is dead-lettered after MAX_DELIVERIES of
-- them. Restarts, claims and outages are not failures of the entry and are not counted here.
-- A row goes when its entry is dead-lettered or applied.
CREATE TABLE entry_failures (
    stream_entry_id TEXT        NOT NULL CONSTRAINT entry_failures_pkey PRIMARY KEY,
    event_id        TEXT,
    failures        INT         NOT NULL CONSTRAINT entry_failures_failures_positive CHECK (failures > 0),
    last_error      TEXT        NOT NULL,
    first_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_failed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
