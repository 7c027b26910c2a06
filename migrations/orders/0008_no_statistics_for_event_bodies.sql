-- The event bodies and trace contexts are carried, never searched: no statement filters or
-- joins on them, so the planner needs no statistics about them. Gathering them made every
-- ANALYZE of the outbox tables (run by the relays' table upkeep as the tables turn over)
-- two to three times as expensive: each sampled payload is detoasted and compared.
ALTER TABLE outbox
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN traceparent SET STATISTICS 0,
    ALTER COLUMN tracestate SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0;
ALTER TABLE outbox_published
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN traceparent SET STATISTICS 0,
    ALTER COLUMN tracestate SET STATISTICS 0;
