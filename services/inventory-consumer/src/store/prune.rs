//! Removing dedupe state past its retention, in bounded batches ([`service_kit::prune`]), and
//! sampling the parked events. Why removing it is safe: [`crate::retention`].

use std::time::Duration;

use service_kit::prune::delete_in_batches;
use service_kit::Shutdown;
use sqlx::PgPool;

/// Removes `processed_messages` rows older than `retention`, the oldest first, until none is
/// left, `statements` were run, or shutdown; how many went. Rows another replica is removing
/// are skipped.
pub async fn processed(
    pool: &PgPool,
    retention: Duration,
    statements: u32,
    shutdown: &Shutdown,
) -> Result<u64, sqlx::Error> {
    delete_in_batches(
        pool,
        "DELETE FROM processed_messages WHERE event_id IN ( \
           SELECT event_id FROM processed_messages \
           WHERE processed_at < now() - $1 * interval '1 millisecond' \
           ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        retention,
        statements,
        shutdown,
    )
    .await
}

/// Removes the checkpoint of each closed order whose latest applied event is older than
/// `retention`, with its reservation, as [`processed`] does; how many orders went.
pub async fn closed_orders(
    pool: &PgPool,
    retention: Duration,
    statements: u32,
    shutdown: &Shutdown,
) -> Result<u64, sqlx::Error> {
    delete_in_batches(
        pool,
        "WITH gone AS ( \
           DELETE FROM aggregate_checkpoints WHERE aggregate_id IN ( \
             SELECT aggregate_id FROM aggregate_checkpoints \
             WHERE closed AND last_occurred_at < now() - $1 * interval '1 millisecond' \
             LIMIT $2 FOR UPDATE SKIP LOCKED) \
           RETURNING aggregate_id), \
         reservations AS (DELETE FROM order_reservations WHERE order_id IN (SELECT aggregate_id FROM gone)) \
         SELECT 1 FROM gone",
        retention,
        statements,
        shutdown,
    )
    .await
}

/// How many events are parked, and the oldest: its order, seq and age in seconds.
pub struct ParkedSample {
    pub count: i64,
    pub oldest: Option<(String, i64, f64)>,
}

pub async fn parked(pool: &PgPool) -> Result<ParkedSample, sqlx::Error> {
    let count = sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM parked_events"#).fetch_one(pool).await?;
    let oldest = sqlx::query!(
        r#"SELECT aggregate_id, seq, EXTRACT(EPOCH FROM now() - parked_at)::float8 AS "age!"
           FROM parked_events ORDER BY parked_at LIMIT 1"#
    )
    .fetch_optional(pool)
    .await?;
    Ok(ParkedSample { count, oldest: oldest.map(|o| (o.aggregate_id, o.seq, o.age)) })
}
