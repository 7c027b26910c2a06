//! `outbox_published`: the events published, kept for the retention window so they can be
//! published again; read back in id order, trimmed in bounded batches by one relay at a time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::row::OutboxRow;

/// Session advisory lock held by the relay that trims ("outbox" + 1).
const RETENTION_LOCK: i64 = 0x6f75_7462_6f79;

/// Each statement looks at the `batch × WINDOW` lowest ids only. Rows are published in about
/// id order, so those are the oldest; the few published late (retried after backing off or
/// being dead) sit among them until they expire too, without stopping the rest from being
/// trimmed unless they fill the whole window. No statement scans the table.
const WINDOW: i64 = 4;

/// What a trim did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimReport {
    pub deleted: u64,
    pub statements: u32,
    /// Another relay held the trimming lock.
    pub skipped: bool,
}

/// Deletes published rows older than `retention`, at most `batch` per statement, pausing
/// between statements so trimming never competes hard with publishing. Stops early on
/// shutdown.
pub async fn trim_published(
    pool: &PgPool,
    retention: Duration,
    batch: u32,
    pause: Duration,
    shutdown: &CancellationToken,
) -> Result<TrimReport, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked = sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "locked!""#, RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(TrimReport { skipped: true, ..TrimReport::default() });
    }
    let retention_ms = retention.as_millis() as f64;
    let mut report = TrimReport::default();
    let result = loop {
        let deleted = sqlx::query!(
            "DELETE FROM outbox_published WHERE id IN (
               SELECT id FROM (SELECT id, published_at FROM outbox_published ORDER BY id LIMIT $3) oldest
               WHERE published_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
            retention_ms,
            i64::from(batch),
            i64::from(batch) * WINDOW,
        )
        .execute(&mut *conn)
        .await;
        match deleted {
            Ok(done) => {
                report.statements += 1;
                report.deleted += done.rows_affected();
                if done.rows_affected() < u64::from(batch) {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    };
    let unlocked = sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", RETENTION_LOCK).fetch_one(&mut *conn).await;
    if unlocked.is_err() {
        // The lock is session scoped: never hand a connection that may still hold it back to the pool.
        conn.detach();
    }
    result.map(|()| report)
}

/// Up to `limit` events published at or after `since` (of one aggregate, if given), with ids
/// above `after`, in id order: one page of a republishing.
pub async fn page(
    pool: &PgPool,
    since: DateTime<Utc>,
    aggregate_id: Option<&str>,
    after: i64,
    limit: u32,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as!(
        OutboxRow,
        r#"SELECT id, event_id, aggregate_type, aggregate_id, seq, event_type, payload::text AS "payload!",
                  occurred_at, traceparent, tracestate, attempts, created_at, tenant_id
           FROM outbox_published
           WHERE published_at >= $1 AND id > $2 AND ($3::text IS NULL OR aggregate_id = $3)
           ORDER BY id LIMIT $4"#,
        since,
        after,
        aggregate_id,
        i64::from(limit),
    )
    .fetch_all(pool)
    .await
}
