//! Dead-lettered rows: listing, retrying and purging.

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
    sqlx::query_as!(
        DeadEvent,
        "SELECT event_id, aggregate_id, seq, attempts, last_error FROM outbox WHERE status = 'dead' ORDER BY id"
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
    let done = sqlx::query!(
        "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = now()
         WHERE status = 'dead' AND ($1::text IS NULL OR event_id = $1)",
        event_id,
    )
    .execute(pool)
    .await?;
    sqlx::query!(r#"SELECT pg_notify($1, '') AS "notified: ()""#, crate::CHANNEL).execute(pool).await?;
    Ok(done.rows_affected())
}

/// One row removed by [`purge_dead`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PurgedEvent {
    pub event_id: String,
    pub aggregate_id: String,
    pub seq: i64,
    /// `dead`, or `pending` for a later event of the same order that waited behind it.
    pub status: String,
}

/// Orders whose events one statement removes at most.
const PURGE_BATCH: i64 = 1_000;

/// Removes dead rows written longer than `older_than` ago, each with every later event of its
/// order still in the outbox (held back behind it, none could ever be delivered in order), in
/// batches of orders. Returns what it removed.
pub async fn purge_dead(pool: &PgPool, older_than: std::time::Duration) -> Result<Vec<PurgedEvent>, sqlx::Error> {
    let mut purged = Vec::new();
    loop {
        let rows = sqlx::query_as!(
            PurgedEvent,
            "WITH doomed AS (
               SELECT aggregate_id, min(seq) AS seq FROM outbox
               WHERE status = 'dead' AND created_at < now() - $1 * interval '1 millisecond'
               GROUP BY aggregate_id ORDER BY aggregate_id LIMIT $2)
             DELETE FROM outbox o USING doomed d WHERE o.aggregate_id = d.aggregate_id AND o.seq >= d.seq
             RETURNING o.event_id, o.aggregate_id, o.seq, o.status",
            older_than.as_secs_f64() * 1000.0,
            PURGE_BATCH,
        )
        .fetch_all(pool)
        .await?;
        let orders = rows
            .iter()
            .filter(|r| r.status == "dead")
            .map(|r| &r.aggregate_id)
            .collect::<std::collections::HashSet<_>>()
            .len();
        purged.extend(rows);
        if orders < PURGE_BATCH as usize {
            return Ok(purged);
        }
    }
}
