//! What the replay demo ([`crate::replay_demo`]) reads of an event's dedupe state.

use sqlx::PgPool;

/// The order of `event_id`, if its application is recorded.
pub async fn applied_order(pool: &PgPool, event_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!("SELECT aggregate_id FROM processed_messages WHERE event_id = $1", event_id)
        .fetch_optional(pool)
        .await
}

/// The seq last applied of `aggregate_id`.
pub async fn checkpoint(pool: &PgPool, aggregate_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!("SELECT last_seq FROM aggregate_checkpoints WHERE aggregate_id = $1", aggregate_id)
        .fetch_one(pool)
        .await
}

/// How many times the application of `event_id` is recorded (at most once).
pub async fn processed_rows(pool: &PgPool, event_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM processed_messages WHERE event_id = $1"#, event_id)
        .fetch_one(pool)
        .await
}
