//! Recording why a claim's rows were not published, after its transaction rolled back.
//!
//! The rows are then no longer locked by the claim, so every statement here is fenced: it
//! skips rows another claim holds right now (`SKIP LOCKED`) and rows whose attempt count
//! changed since this claim read them (another relay recorded an outcome meanwhile). A relay
//! whose lease ran out can therefore not overwrite the work of the relay that took over.

use std::time::Duration;

use sqlx::PgPool;

/// A failed attempt of one row, as the claim read it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: i64,
    /// `attempts` when claimed.
    pub attempts: i32,
    pub retry_in: Duration,
    /// Why this row's attempt failed.
    pub error: String,
}

/// What a failure did to a row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FailureOutcome {
    pub id: i64,
    pub attempts: i32,
    pub status: String,
}

/// Records a failed attempt of each row: `attempts` + 1, its error, the next attempt time;
/// rows reaching `max_attempts` become dead. Only failures that belong to a row come here: an
/// outage of Redis or Postgres is no attempt.
pub async fn record_failures(
    pool: &PgPool,
    failures: &[Failure],
    max_attempts: u32,
) -> Result<Vec<FailureOutcome>, sqlx::Error> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
    let seen: Vec<i32> = failures.iter().map(|f| f.attempts).collect();
    let delays_ms: Vec<f64> = failures.iter().map(|f| f.retry_in.as_secs_f64() * 1000.0).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    sqlx::query_as!(
        FailureOutcome,
        "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::text[])
                    AS f(id, seen, delay_ms, error)),
         mine AS (SELECT o.id, f.delay_ms, f.error FROM outbox o JOIN f ON f.id = o.id
                  WHERE o.status = 'pending' AND o.attempts = f.seen FOR UPDATE OF o SKIP LOCKED)
         UPDATE outbox o SET attempts = o.attempts + 1, last_error = mine.error,
             next_attempt_at = now() + mine.delay_ms * interval '1 millisecond',
             status = CASE WHEN o.attempts + 1 >= $5::bigint THEN 'dead' ELSE 'pending' END
         FROM mine WHERE o.id = mine.id
         RETURNING o.id, o.attempts, o.status",
        &ids,
        &seen,
        &delays_ms,
        &errors as _,
        i64::from(max_attempts),
    )
    .fetch_all(pool)
    .await
}

/// A row that can never be published, as the claim read it, and why.
#[derive(Debug, Clone)]
pub struct Poison {
    pub id: i64,
    /// `attempts` when claimed.
    pub attempts: i32,
    pub reason: String,
}

/// Dead-letters rows that can never be published, each with its reason. Returns the number
/// of rows marked.
pub async fn mark_dead(pool: &PgPool, rows: &[Poison]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|p| p.id).collect();
    let seen: Vec<i32> = rows.iter().map(|p| p.attempts).collect();
    let reasons: Vec<&str> = rows.iter().map(|p| p.reason.as_str()).collect();
    let done = sqlx::query!(
        "WITH d AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[]) AS d(id, seen, reason)),
         mine AS (SELECT o.id, d.reason FROM outbox o JOIN d ON d.id = o.id
                  WHERE o.status = 'pending' AND o.attempts = d.seen FOR UPDATE OF o SKIP LOCKED)
         UPDATE outbox o SET status = 'dead', attempts = o.attempts + 1, last_error = mine.reason
         FROM mine WHERE o.id = mine.id",
        &ids,
        &seen,
        &reasons as _,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
