//! The `dead_letters` table: recording happens with a batch ([`super::batch`]); here, listing,
//! the re-drive's reads and marks, and purging.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRow {
    pub id: i64,
    pub stream_entry_id: String,
    pub event_id: Option<String>,
    pub aggregate_id: Option<String>,
    pub reason: String,
    pub fields: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
}

/// Newest first; `all` includes those already re-driven.
pub async fn list(pool: &PgPool, all: bool) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as!(
        DeadLetterRow,
        "SELECT id, stream_entry_id, event_id, aggregate_id, reason, fields, created_at, redriven_at
         FROM dead_letters WHERE $1 OR redriven_at IS NULL ORDER BY id DESC LIMIT 1000",
        all,
    )
    .fetch_all(pool)
    .await
}

/// Locks the dead letters not yet re-driven (`id`, or all), oldest first, with their fields.
pub async fn lock_waiting(
    tx: &mut PgConnection,
    id: Option<i64>,
) -> Result<Vec<(i64, serde_json::Value)>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT id, fields FROM dead_letters WHERE redriven_at IS NULL AND ($1::bigint IS NULL OR id = $1)
         ORDER BY id LIMIT 10000 FOR UPDATE",
        id,
    )
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.fields)).collect())
}

pub async fn mark_redriven(tx: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query!("UPDATE dead_letters SET redriven_at = now() WHERE id = $1", id).execute(tx).await.map(drop)
}

/// Removes dead letters recorded longer than `older_than` ago, the oldest first, in batches
/// ([`service_kit::prune`]), until none is left, `statements` statements were run, or
/// shutdown; how many went. The dead-letter stream is capped on its own (`REDIS_DLQ_MAX_LEN`).
pub async fn purge(
    pool: &PgPool,
    older_than: std::time::Duration,
    statements: u32,
    shutdown: &service_kit::Shutdown,
) -> Result<u64, sqlx::Error> {
    service_kit::prune::delete_in_batches(
        pool,
        "DELETE FROM dead_letters WHERE id IN ( \
           SELECT id FROM dead_letters WHERE created_at < now() - $1 * interval '1 millisecond' \
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        older_than,
        statements,
        shutdown,
    )
    .await
}
