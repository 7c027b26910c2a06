//! The `entry_failures` table: failures that belong to a stream entry (the database refused
//! what it carries), counted across replicas and restarts. Only these count towards
//! `MAX_DELIVERIES`; Redis's own delivery count also counts restarts, claims and outages, and
//! dead-lettering by it would turn those into lost orders.

use sqlx::PgConnection;

/// Counts one more failure of `stream_entry_id`; returns how many it has had.
pub async fn record(
    conn: &mut PgConnection,
    stream_entry_id: &str,
    event_id: Option<&str>,
    error: &str,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO entry_failures (stream_entry_id, event_id, failures, last_error) VALUES ($1, $2, 1, $3) \
         ON CONFLICT (stream_entry_id) DO UPDATE \
         SET failures = entry_failures.failures + 1, last_error = excluded.last_error, last_failed_at = now() \
         RETURNING failures",
    )
    .bind(stream_entry_id)
    .bind(event_id)
    .bind(error)
    .fetch_one(conn)
    .await
}

/// Forgets the failures of entries that were dead-lettered or applied after all.
pub async fn forget(conn: &mut PgConnection, stream_entry_ids: &[&str]) -> Result<(), sqlx::Error> {
    if stream_entry_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM entry_failures WHERE stream_entry_id = ANY($1)")
        .bind(stream_entry_ids)
        .execute(conn)
        .await
        .map(|_| ())
}
