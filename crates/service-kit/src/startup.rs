//! Start-up that survives dependencies being down: connect lazily, retry migrations with
//! capped backoff until they apply or the service is told to stop.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::{Backoff, Shutdown};

/// A pool that connects on first use, so a service starts (and reports not-ready) while
/// Postgres is down.
pub fn lazy_pool_with(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// Applies `migrator`, retrying with backoff (capped at 10 s) while the database is
/// unreachable. Returns `None` if shutdown was requested first. Several replicas may run this at
/// once: sqlx takes an advisory lock around the migration.
pub async fn migrate_with_retry(pool: &PgPool, migrator: &Migrator, shutdown: &Shutdown) -> Option<()> {
    let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let delay = retry.next_delay();
        match migrator.run(pool).await {
            Ok(()) => return Some(()),
            Err(e) => tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "migrations not applied yet"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
