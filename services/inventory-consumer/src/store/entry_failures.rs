//! The `entry_failures` table: failures that belong to a stream entry (the database refused
//! what it carries), counted across replicas and restarts. Only these count towards
//! `MAX_DELIVERIES`; Redis's own delivery count also counts restarts, claims and outages, and
//! dead-lettering by it would turn those into lost orders.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

/// Counts one more failure of `stream_entry_id`; returns how many it has had.
pub async fn record(
    conn: &mut PgConnection,
    stream_entry_id: &str,
    event_id: Option<&str>,
    error: &str,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO entry_failures (stream_entry_id, event_id, failures, last_error) VALUES ($1, $2, 1, $3)
         ON CONFLICT (stream_entry_id) DO UPDATE
         SET failures = entry_failures.failures + 1, last_error = excluded.last_error, last_failed_at = now()
         RETURNING failures",
        stream_entry_id,
        event_id,
        error,
    )
    .fetch_one(conn)
    .await
}

/// Forgets the failures of entries that were dead-lettered or applied after all.
pub async fn forget(conn: &mut PgConnection, stream_entry_ids: &[&str]) -> Result<(), sqlx::Error> {
    if stream_entry_ids.is_empty() {
        return Ok(());
    }
    sqlx::query!("DELETE FROM entry_failures WHERE stream_entry_id = ANY($1)", stream_entry_ids as _)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Removes the counts of entries whose last failure is older than `older_than`, in batches
/// ([`service_kit::prune`]), until none is left, `statements` were run, or shutdown.
pub async fn prune(
    pool: &PgPool,
    older_than: Duration,
    statements: u32,
    shutdown: &service_kit::Shutdown,
) -> Result<u64, sqlx::Error> {
    service_kit::prune::delete_in_batches(
        pool,
        "DELETE FROM entry_failures WHERE stream_entry_id IN ( \
           SELECT stream_entry_id FROM entry_failures \
           WHERE last_failed_at < now() - $1 * interval '1 millisecond' \
           ORDER BY last_failed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        older_than,
        statements,
        shutdown,
    )
    .await
}
