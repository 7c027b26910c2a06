//! Recording a claim's outcome. Every statement is fenced by the claim's token: rows whose
//! lease expired and were claimed again by another relay are not touched.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// Moves published rows to `outbox_published`. Returns the number moved.
pub async fn mark_published(pool: &PgPool, token: Uuid, ids: &[i64]) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "WITH moved AS (DELETE FROM outbox WHERE id = ANY($1) AND lease_owner = $2 \
           RETURNING id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
                     traceparent, tracestate, attempts, created_at) \
         INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, \
                                       occurred_at, traceparent, tracestate, attempts, created_at) \
         SELECT * FROM moved",
    )
    .bind(ids)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A failed attempt of one row.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    pub id: i64,
    pub retry_in: Duration,
}

/// What a failure did to a row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FailureOutcome {
    pub id: i64,
    pub attempts: i32,
    pub status: String,
}

/// Records a failed attempt: `attempts` + 1, the error, the next attempt time; rows reaching
/// `max_attempts` become dead. The lease is released.
pub async fn record_failures(
    pool: &PgPool,
    token: Uuid,
    failures: &[Failure],
    error: &str,
    max_attempts: u32,
) -> Result<Vec<FailureOutcome>, sqlx::Error> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
    let delays_ms: Vec<f64> = failures.iter().map(|f| f.retry_in.as_secs_f64() * 1000.0).collect();
    sqlx::query_as(
        "UPDATE outbox o SET attempts = o.attempts + 1, last_error = $3, \
             next_attempt_at = now() + f.delay_ms * interval '1 millisecond', \
             status = CASE WHEN o.attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END, \
             lease_owner = NULL, lease_expires_at = NULL \
         FROM unnest($1::bigint[], $2::float8[]) AS f(id, delay_ms) \
         WHERE o.id = f.id AND o.lease_owner = $5 \
         RETURNING o.id, o.attempts, o.status",
    )
    .bind(&ids)
    .bind(&delays_ms)
    .bind(error)
    .bind(i64::from(max_attempts))
    .bind(token)
    .fetch_all(pool)
    .await
}

/// Dead-letters rows that can never be published, each with its reason.
pub async fn mark_dead(pool: &PgPool, token: Uuid, rows: &[(i64, String)]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = rows.iter().map(|(_, r)| r.as_str()).collect();
    let done = sqlx::query(
        "UPDATE outbox o SET status = 'dead', attempts = o.attempts + 1, last_error = d.reason, \
             lease_owner = NULL, lease_expires_at = NULL \
         FROM unnest($1::bigint[], $2::text[]) AS d(id, reason) \
         WHERE o.id = d.id AND o.lease_owner = $3",
    )
    .bind(&ids)
    .bind(&reasons)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives rows back (lease cleared, nothing recorded), e.g. on shutdown before publishing.
pub async fn release(pool: &PgPool, token: Uuid, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox SET lease_owner = NULL, lease_expires_at = NULL WHERE id = ANY($1) AND lease_owner = $2",
    )
    .bind(ids)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
