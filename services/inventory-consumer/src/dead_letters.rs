//! Listing and re-driving dead letters.

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use sqlx::{PgPool, Row};

use crate::entries::fields_from_json;
use crate::stream;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("no dead letter {0} waiting to be re-driven")]
    NotFound(i64),
}

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
    let rows = sqlx::query(
        "SELECT id, stream_entry_id, event_id, aggregate_id, reason, fields, created_at, redriven_at \
         FROM dead_letters WHERE $1 OR redriven_at IS NULL ORDER BY id DESC LIMIT 1000",
    )
    .bind(all)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DeadLetterRow {
                id: r.try_get(0)?,
                stream_entry_id: r.try_get(1)?,
                event_id: r.try_get(2)?,
                aggregate_id: r.try_get(3)?,
                reason: r.try_get(4)?,
                fields: r.try_get(5)?,
                created_at: r.try_get(6)?,
                redriven_at: r.try_get(7)?,
            })
        })
        .collect()
}

/// Re-adds the original fields of dead letter `id` (or of all not yet re-driven) to `stream`
/// and marks them re-driven. Returns (dead letter id, new entry id) pairs.
///
/// The row is locked while its entry is added, so two operators cannot re-drive it twice; if
/// the mark fails after the XADD the entry is on the stream once more, which the consumer's
/// deduplication absorbs.
pub async fn redrive(
    pool: &PgPool,
    conn: &mut MultiplexedConnection,
    stream_key: &str,
    id: Option<i64>,
) -> Result<Vec<(i64, String)>, DeadLetterError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, fields FROM dead_letters WHERE redriven_at IS NULL AND ($1::bigint IS NULL OR id = $1) \
         ORDER BY id LIMIT 10000 FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    if let (Some(id), true) = (id, rows.is_empty()) {
        return Err(DeadLetterError::NotFound(id));
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let dl_id: i64 = row.try_get(0)?;
        let fields = fields_from_json(&row.try_get(1)?);
        let new_id = stream::add(conn, stream_key, &fields).await?;
        sqlx::query("UPDATE dead_letters SET redriven_at = now() WHERE id = $1").bind(dl_id).execute(&mut *tx).await?;
        tracing::info!(dead_letter = dl_id, entry_id = %new_id, "re-driven");
        out.push((dl_id, new_id));
    }
    tx.commit().await?;
    Ok(out)
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
