-- Parked entries' fields and reservations' items are read by key, never searched: the planner
-- needs no statistics about them, and gathering them made the consumers' table upkeep
-- (ANALYZE as the tables turn over) detoast and compare every sampled value.
ALTER TABLE parked_events ALTER COLUMN fields SET STATISTICS 0;
ALTER TABLE order_reservations
    ALTER COLUMN items SET STATISTICS 0,
    ALTER COLUMN reason SET STATISTICS 0;
