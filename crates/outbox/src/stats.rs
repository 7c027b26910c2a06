//! What the relays watch in the outbox: its size and age, and when the next backing-off row is
//! due.

use std::time::Duration;

use sqlx::PgPool;

/// The outbox at one moment. It holds only pending and dead rows, so counting stays cheap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub pending: i64,
    pub dead: i64,
    /// Age of the oldest pending row (0 without any).
    pub oldest_pending_age_seconds: f64,
}

pub async fn sample(pool: &PgPool) -> Result<Sample, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'pending') AS "pending!",
                  count(*) FILTER (WHERE status = 'dead') AS "dead!",
                  EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8 AS oldest
           FROM outbox"#
    )
    .fetch_one(pool)
    .await?;
    Ok(Sample { pending: row.pending, dead: row.dead, oldest_pending_age_seconds: row.oldest.unwrap_or(0.0).max(0.0) })
}

/// How long until the earliest backing-off row is due, if any is. Only attempted rows back off;
/// they are in the small `outbox_held_back_idx`.
pub async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let secs = sqlx::query_scalar!(
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8 FROM outbox
         WHERE status = 'pending' AND attempts > 0 AND next_attempt_at > now()"
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}
