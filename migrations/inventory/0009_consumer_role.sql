-- The consumer loop's own role.
--
-- The loop applies every tenant's events, so it cannot run as the stock API's role, which
-- row-level security holds to one tenant. It runs as `inventory_consumer`
-- (DATABASE_CONSUMER_ROLE), which this migration creates (NOLOGIN) unless it exists: not a
-- superuser, no BYPASSRLS, owning nothing, with a policy that shows it every tenant's stock
-- and reservations, and only the privileges applying, dead-lettering and pruning use (it
-- never creates or deletes stock). Vacuuming, which needs the owner, stays with the migrating
-- connection.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'inventory_consumer') THEN
        CREATE ROLE inventory_consumer NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- As for inventory_app (0008): the migrating role may switch to it.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'inventory_consumer', 'MEMBER') THEN
        EXECUTE format('GRANT inventory_consumer TO %I', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot make % a member of inventory_consumer: grant it before the consumers start', current_user;
    WHEN unique_violation THEN
        NULL;
END
$$;

CREATE POLICY consumer_all_tenants ON inventory TO inventory_consumer USING (true) WITH CHECK (true);
CREATE POLICY consumer_all_tenants ON order_reservations TO inventory_consumer USING (true) WITH CHECK (true);

GRANT SELECT, UPDATE ON inventory TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON order_reservations TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON processed_messages TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON aggregate_checkpoints TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON parked_events TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON dead_letters TO inventory_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON entry_failures TO inventory_consumer;
GRANT USAGE ON SEQUENCE dead_letters_id_seq TO inventory_consumer;
