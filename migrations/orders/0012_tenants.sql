-- Tenants, enforced by row-level security.
--
-- Every order, idempotency key and event belongs to a tenant. Rows written before this
-- migration, and rows written by a session that names no tenant, belong to `default`.
-- Idempotency keys are per tenant: two tenants may use the same key.
--
-- Each tenant table has ENABLE and FORCE ROW LEVEL SECURITY, and the policy
-- `tenant_isolation`: a session sees and writes only the rows of the tenant in its setting
-- `app.tenant_id`, and none when the setting is unset or empty. FORCE applies it to the
-- tables' owner too; superusers and roles with BYPASSRLS are not subject to it.
--
-- Request transactions run as the role `outbox_app`, which this migration creates (NOLOGIN)
-- unless it exists, and grants only what requests need. An outbox row takes its tenant from
-- the transaction that appends it.

ALTER TABLE orders ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE idempotency_keys ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE outbox ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE outbox_published ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';

-- From now on a row takes the session's tenant unless its statement names one. (The constant
-- default above filled the existing rows without rewriting the tables.)
ALTER TABLE orders ALTER COLUMN tenant_id SET DEFAULT COALESCE(NULLIF(current_setting('app.tenant_id', true), ''), 'default');
ALTER TABLE idempotency_keys ALTER COLUMN tenant_id SET DEFAULT COALESCE(NULLIF(current_setting('app.tenant_id', true), ''), 'default');
ALTER TABLE outbox ALTER COLUMN tenant_id SET DEFAULT COALESCE(NULLIF(current_setting('app.tenant_id', true), ''), 'default');

-- Published rows are only ever moved in by the claim, which names the tenant: a relay from
-- before this migration (whose prepared claim does not) fails to publish, and is replaced,
-- instead of labelling every tenant's events `default`.
ALTER TABLE outbox_published ALTER COLUMN tenant_id DROP DEFAULT;

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (tenant_id, key);

ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON orders
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON idempotency_keys
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON outbox
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE outbox_published ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox_published FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON outbox_published
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

-- Roles belong to the whole server, and several databases may be migrated at once.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_app') THEN
        CREATE ROLE outbox_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- The migrating role (the tables' owner, which the services connect as unless told otherwise)
-- becomes a member of the runtime role, so it can SET ROLE to it and a deployment upgraded
-- with its existing DATABASE_URL keeps working. A superuser already may.
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'outbox_app', 'MEMBER') THEN
        EXECUTE format('GRANT outbox_app TO %I', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot make % a member of outbox_app: grant it before the services start', current_user;
    WHEN unique_violation THEN
        NULL; -- granted meanwhile by a migration of another database

END
$$;

-- What request transactions do: create, read and move orders (never delete them), claim and
-- read idempotency keys, and append events (`outbox_append` returns the new row's id, so it
-- reads that column back). Expired keys are removed by the service's own connection, not by
-- requests.
GRANT SELECT, INSERT, UPDATE ON orders TO outbox_app;
GRANT SELECT, INSERT, UPDATE ON idempotency_keys TO outbox_app;
GRANT INSERT ON outbox TO outbox_app;
GRANT SELECT (id) ON outbox TO outbox_app;

-- The role is the whole server's, granted the same on every database migrated there: a member
-- of it could use it in another database of the server. Connecting is therefore left to this
-- database's owner, superusers and roles granted CONNECT.
DO $$
BEGIN
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', current_database());
END
$$;
