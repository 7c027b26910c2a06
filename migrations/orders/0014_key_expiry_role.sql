-- The role that removes expired idempotency keys.
--
-- Keys of every tenant expire, so their removal cannot run as the request role, which
-- row-level security holds to one tenant. It runs as `outbox_key_expiry`
-- (DATABASE_KEY_EXPIRY_ROLE of order-service), which this migration creates (NOLOGIN) unless
-- it exists: not a superuser, no BYPASSRLS, owning nothing, with a policy that shows it every
-- tenant's keys, and only what the removal uses. It reads a key's tenant, key and age, never
-- the stored request or response; `FOR UPDATE SKIP LOCKED` (so replicas skip each other's
-- rows) needs UPDATE on a column, which it has on `created_at` alone.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_key_expiry') THEN
        CREATE ROLE outbox_key_expiry NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- As for outbox_app (0012): the migrating role may switch to it.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'outbox_key_expiry', 'MEMBER') THEN
        EXECUTE format('GRANT outbox_key_expiry TO %I', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot make % a member of outbox_key_expiry: grant it before order-service starts', current_user;
    WHEN unique_violation THEN
        NULL;
END
$$;

CREATE POLICY key_expiry_all_tenants ON idempotency_keys TO outbox_key_expiry USING (true) WITH CHECK (true);

GRANT SELECT (tenant_id, key, created_at), UPDATE (created_at), DELETE ON idempotency_keys TO outbox_key_expiry;
