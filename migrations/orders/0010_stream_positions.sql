-- What the relays know of each stream, to notice when Redis loses it and republish from the
-- right point: the marker they left in Redis (`<stream>:relay-epoch`), which goes with the data
-- when Redis restarts empty; the time below which every consumer group had acknowledged every
-- entry (milliseconds, from entry ids), recorded as the stream is trimmed; and a republishing
-- owed after a loss (from `recover_since`), held by one relay at a time for a renewed minute
-- (`recovering_until`), so a relay that stops half-way leaves it to another.
CREATE TABLE stream_positions (
    stream           TEXT        NOT NULL CONSTRAINT stream_positions_pkey PRIMARY KEY,
    epoch            TEXT        NOT NULL,
    acked_below_ms   BIGINT,
    recover_since    TIMESTAMPTZ,
    recovering_until TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
