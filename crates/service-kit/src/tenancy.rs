//! The role and tenant every request transaction runs as, which row-level security sees.
//!
//! Each transaction starts with one round trip that begins it, switches to the runtime role
//! (`SET LOCAL ROLE`, `DATABASE_RUNTIME_ROLE`) and names the request's tenant
//! (`SET LOCAL app.tenant_id`). Both end with the transaction, so a pooled connection never
//! carries one request's tenant into the next. The role and the tenant are validated names
//! ([`RoleName`], [`TenantId`]), safe to write into the statement.

use domain::TenantId;
use sqlx::{Connection as _, PgConnection, Postgres, Transaction};

use crate::session::RoleName;

/// Starts request transactions as the runtime role.
#[derive(Debug, Clone)]
pub struct Tenancy {
    role: RoleName,
}

impl Tenancy {
    pub fn new(role: RoleName) -> Self {
        Self { role }
    }

    pub fn role(&self) -> &RoleName {
        &self.role
    }

    /// The statement that begins a transaction of `tenant`.
    pub fn begin_statement(&self, tenant: &TenantId) -> String {
        format!("BEGIN; SET LOCAL ROLE \"{}\"; SET LOCAL app.tenant_id = '{tenant}'", self.role)
    }

    /// Begins a transaction of `tenant` on `conn`, as the runtime role.
    pub async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
        tenant: &TenantId,
    ) -> Result<Transaction<'c, Postgres>, sqlx::Error> {
        conn.begin_with(self.begin_statement(tenant)).await
    }

    /// [`Tenancy::begin`] on a connection of `pool`, which the transaction owns.
    pub async fn begin_in(
        &self,
        pool: &sqlx::PgPool,
        tenant: &TenantId,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        pool.begin_with(self.begin_statement(tenant)).await
    }
}

/// Why the runtime role would not be held by row-level security on `tables` (of the current
/// schema), if it would not.
pub async fn check_role(
    conn: &mut PgConnection,
    role: &RoleName,
    tables: &[&str],
) -> Result<Option<String>, sqlx::Error> {
    let found = sqlx::query!(
        r#"SELECT r.rolsuper AS "superuser!", r.rolbypassrls AS "bypasses_rls!",
                  CASE WHEN current_setting('server_version_num')::int >= 160000
                       THEN pg_has_role(session_user, r.oid, 'SET')
                       ELSE pg_has_role(session_user, r.oid, 'MEMBER') END AS "reachable!",
                  EXISTS (SELECT 1 FROM pg_class c
                          WHERE c.relname = ANY($2)
                            AND c.relnamespace = current_schema()::regnamespace
                            AND pg_has_role(r.oid, c.relowner, 'MEMBER')) AS "owns_tables!"
           FROM pg_roles r WHERE r.rolname = $1"#,
        role.as_str(),
        tables as _,
    )
    .fetch_optional(conn)
    .await?;
    Ok(match found {
        None => Some(format!("the runtime role {role} does not exist")),
        Some(r) if r.superuser => {
            Some(format!("the runtime role {role} is a superuser: row-level security would not apply"))
        }
        Some(r) if r.bypasses_rls => {
            Some(format!("the runtime role {role} has BYPASSRLS: row-level security would not apply"))
        }
        Some(r) if r.owns_tables => {
            Some(format!("the runtime role {role} owns the tables (or is a member of their owner)"))
        }
        Some(r) if !r.reachable => {
            Some(format!("the database user is not a member of the runtime role {role}, so cannot SET ROLE to it"))
        }
        Some(_) => None,
    })
}

/// Why the session's role cannot do cross-tenant work on `tables` (relaying every tenant's
/// events, applying them), if it cannot: row-level security, forced on the tenant tables,
/// shows it every tenant's rows only if it is a superuser, has `BYPASSRLS`, or a policy of
/// its own admits every row of each table (the relay's and the consumer's roles have one).
/// Work that went on regardless would stall (a relay) or be wrong (a consumer rejecting every
/// order for lack of stock).
pub async fn check_cross_tenant(
    conn: &mut PgConnection,
    service: &str,
    tables: &[&str],
) -> Result<Option<String>, sqlx::Error> {
    let role = sqlx::query!(
        r#"SELECT current_user AS "name!", rolsuper OR rolbypassrls AS "exempt!",
                  ARRAY(SELECT t FROM unnest($1::text[]) AS t
                        WHERE NOT EXISTS (SELECT 1 FROM pg_policies p
                                          WHERE p.schemaname = current_schema() AND p.tablename = t
                                            AND p.cmd = 'ALL' AND p.qual = 'true'
                                            AND p.roles @> ARRAY[current_user])) AS "held!: Vec<String>"
           FROM pg_roles WHERE rolname = current_user"#,
        tables as _,
    )
    .fetch_one(conn)
    .await?;
    Ok((!role.exempt && !role.held.is_empty()).then(|| {
        format!(
            "the {service} works as the database role {}, which row-level security holds to one tenant on {} (it \
             would see no tenant's rows): use a role with a policy admitting every row (the migrations make one), \
             BYPASSRLS, or a superuser",
            role.name,
            role.held.join(", ")
        )
    }))
}

/// [`check_cross_tenant`] on `pool`, retried while it cannot run: `true` once the role is fit;
/// `false` when it is not (`unfit` then says why, for `/readyz`, and it is logged) or shutdown
/// came first.
pub async fn verify_cross_tenant(
    pool: &sqlx::PgPool,
    service: &str,
    tables: &[&str],
    unfit: &std::sync::OnceLock<String>,
    shutdown: &crate::Shutdown,
) -> bool {
    let check = move || async move { check_cross_tenant(&mut *pool.acquire().await?, service, tables).await };
    verified(check, Verdict { checking: "the database role", refused: "its work does not start" }, unfit, shutdown)
        .await
}

/// [`check_role`] on `pool`, retried while it cannot run, with the outcomes of
/// [`verify_cross_tenant`]: `refused` says what stays closed when the role is unfit.
pub async fn verify_runtime_role(
    pool: &sqlx::PgPool,
    role: &RoleName,
    tables: &[&str],
    refused: &'static str,
    unfit: &std::sync::OnceLock<String>,
    shutdown: &crate::Shutdown,
) -> bool {
    let check = move || async move { check_role(&mut *pool.acquire().await?, role, tables).await };
    verified(check, Verdict { checking: "the runtime role", refused }, unfit, shutdown).await
}

/// How a role check is logged: what it checks, and what does not start when it fails.
struct Verdict {
    checking: &'static str,
    refused: &'static str,
}

/// Runs `check` until it answers (with backoff while it cannot run) or shutdown: `true` if
/// the role is fit; otherwise `unfit` says why, and it is logged.
async fn verified<F, Fut>(
    check: F,
    verdict: Verdict,
    unfit: &std::sync::OnceLock<String>,
    shutdown: &crate::Shutdown,
) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, sqlx::Error>>,
{
    let mut retry = crate::Backoff::new(std::time::Duration::from_millis(200), std::time::Duration::from_secs(10));
    loop {
        match check().await {
            Ok(None) => return true,
            Ok(Some(why)) => {
                tracing::error!("{why}; {}", verdict.refused);
                let _ = unfit.set(why);
                return false;
            }
            // A session that cannot start as its role (not a member of it, or no such role)
            // will not start on a retry: that is the answer, not an outage.
            Err(e) if e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "42501" || c == "42704") => {
                let why = format!("{} cannot be used: {e}", verdict.checking);
                tracing::error!("{why}; {}", verdict.refused);
                let _ = unfit.set(why);
                return false;
            }
            Err(e) => tracing::warn!(error = %e, "checking {} failed; retrying", verdict.checking),
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(retry.next_delay()) => {}
        }
    }
}

/// A `/readyz` check failing with what `unfit` says, once set.
pub fn unfit_check(
    unfit: std::sync::Arc<std::sync::OnceLock<String>>,
) -> impl Fn() -> std::future::Ready<Result<(), String>> + Send + Sync + 'static {
    move || std::future::ready(unfit.get().map_or(Ok(()), |why| Err(why.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_begin_statement_names_role_and_tenant() {
        let tenancy = Tenancy::new(RoleName::parse("outbox_app").expect("role"));
        let tenant = TenantId::parse("t-1").expect("tenant");
        assert_eq!(
            tenancy.begin_statement(&tenant),
            "BEGIN; SET LOCAL ROLE \"outbox_app\"; SET LOCAL app.tenant_id = 't-1'"
        );
    }
}
