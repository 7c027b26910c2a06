-- The relays' own role.
--
-- Relays move every tenant's events, so their work cannot run as the request role, which
-- row-level security holds to one tenant. It runs as `outbox_relay` (DATABASE_RUNTIME_ROLE of
-- the relay), which this migration creates (NOLOGIN) unless it exists: not a superuser, no
-- BYPASSRLS, owning nothing, with a policy that shows it every tenant's rows of the two
-- tables it works on, and privileges on nothing else (no orders, no idempotency keys).
-- Vacuuming, which needs the owner, stays with the migrating connection.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- As for outbox_app (0012): the migrating role may switch to it.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'outbox_relay', 'MEMBER') THEN
        EXECUTE format('GRANT outbox_relay TO %I', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot make % a member of outbox_relay: grant it before the relays start', current_user;
    WHEN unique_violation THEN
        NULL;
END
$$;

CREATE POLICY relay_all_tenants ON outbox TO outbox_relay USING (true) WITH CHECK (true);
CREATE POLICY relay_all_tenants ON outbox_published TO outbox_relay USING (true) WITH CHECK (true);

-- Claiming moves rows from outbox to outbox_published; failures and dead rows update outbox;
-- retention deletes published rows; the stream's epoch and recovery live in stream_positions.
GRANT SELECT, UPDATE, DELETE ON outbox TO outbox_relay;
GRANT SELECT, INSERT, DELETE ON outbox_published TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON stream_positions TO outbox_relay;
