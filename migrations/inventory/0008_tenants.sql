-- Tenants: stock is per tenant and sku, and each order's reservation belongs to the order's
-- tenant (the `tenant_id` of its events; `default` for events without one). Rows written
-- before this migration belong to `default`.
--
-- `inventory` and `order_reservations` have ENABLE and FORCE ROW LEVEL SECURITY and the
-- policy `tenant_isolation` on the session's `app.tenant_id`: the stock API's transactions run
-- as the role `inventory_app` (created here, NOLOGIN, unless it exists) with the request's
-- tenant, and see no other tenant's rows. The consumer applies events of every tenant on its
-- own connection, which the policy does not hold when it is a superuser (or has BYPASSRLS).

ALTER TABLE inventory ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE inventory ALTER COLUMN tenant_id
    SET DEFAULT COALESCE(NULLIF(current_setting('app.tenant_id', true), ''), 'default');
ALTER TABLE inventory DROP CONSTRAINT inventory_pkey;
ALTER TABLE inventory ADD CONSTRAINT inventory_pkey PRIMARY KEY (tenant_id, sku);

ALTER TABLE order_reservations ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
-- The consumer names each reservation's tenant: one from before this migration (which does
-- not, and would merge the tenants' stock of a sku) fails its batches, and is replaced, instead
-- of writing anything.
ALTER TABLE order_reservations ALTER COLUMN tenant_id DROP DEFAULT;

ALTER TABLE inventory ENABLE ROW LEVEL SECURITY;
ALTER TABLE inventory FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON inventory
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

ALTER TABLE order_reservations ENABLE ROW LEVEL SECURITY;
ALTER TABLE order_reservations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON order_reservations
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));

-- Roles belong to the whole server, and several databases may be migrated at once.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'inventory_app') THEN
        CREATE ROLE inventory_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
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
    IF NOT pg_has_role(current_user, 'inventory_app', 'MEMBER') THEN
        EXECUTE format('GRANT inventory_app TO %I', current_user);
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot make % a member of inventory_app: grant it before the services start', current_user;
    WHEN unique_violation THEN
        NULL; -- granted meanwhile by a migration of another database

END
$$;

-- The stock API reads and sets stock; nothing else.
GRANT SELECT, INSERT, UPDATE ON inventory TO inventory_app;

-- The role is the whole server's (see orders migration 0012): connecting is left to this
-- database's owner, superusers and roles granted CONNECT.
DO $$
BEGIN
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', current_database());
END
$$;
