//! Dead-lettered rows: listing and retrying.

use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeadEvent {
    pub event_id: String,
    pub aggregate_id: String,
    pub seq: i64,
    pub attempts: i32,
    pub last_error: Option<String>,
}

pub async fn list_dead(pool: &PgPool) -> Result<Vec<DeadEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, aggregate_id, seq, attempts, last_error FROM outbox WHERE status = 'dead' ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Which dead rows to retry.
#[derive(Debug, Clone, Copy)]
pub enum Retry<'a> {
    One(&'a str),
    All,
}

/// Makes dead rows pending again with a fresh attempt budget, then wakes the relays. Returns
/// how many rows were revived (0 for an event that is not dead).
pub async fn retry_dead(pool: &PgPool, which: Retry<'_>) -> Result<u64, sqlx::Error> {
    let event_id = match which {
        Retry::One(id) => Some(id),
        Retry::All => None,
    };
    let done = sqlx::query(
        "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = now() \
         WHERE status = 'dead' AND ($1::text IS NULL OR event_id = $1)",
    )
    .bind(event_id)
    .execute(pool)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')").bind(outbox::CHANNEL).execute(pool).await?;
    Ok(done.rows_affected())
}
