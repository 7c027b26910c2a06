//! Removing rows past a retention in bounded batches, and how often to do it.
//!
//! Every table a service keeps only for a while is pruned the same way: one `DELETE` of at most
//! [`BATCH`] rows chosen by age (rows another process is removing are skipped), repeated until
//! a statement removes less than a batch, a round's statements run out, or shutdown; and a round
//! every [`pass_interval`], so a short retention takes effect promptly.

use std::time::Duration;

use sqlx::PgPool;

use crate::Shutdown;

/// Rows one statement removes at most.
pub const BATCH: i64 = 1_000;

/// Runs `statement` (its `$1`: the retention in milliseconds, a float; its `$2`: [`BATCH`])
/// until it removes less than a batch, `statements` times, or shutdown; the rows removed.
pub async fn delete_in_batches(
    pool: &PgPool,
    statement: &str,
    retention: Duration,
    statements: u32,
    shutdown: &Shutdown,
) -> Result<u64, sqlx::Error> {
    let mut removed = 0;
    for _ in 0..statements {
        let done = sqlx::query(statement).bind(millis(retention)).bind(BATCH).execute(pool).await?.rows_affected();
        removed += done;
        if done < BATCH as u64 || shutdown.is_cancelled() {
            break;
        }
    }
    Ok(removed)
}

/// `d` in milliseconds, for `now() - $n * interval '1 millisecond'`.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How often state kept for `retention` is pruned: every 30 s, or every half retention if that
/// is shorter (at most every 100 ms).
pub fn pass_interval(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_run_at_least_every_30_seconds_and_follow_short_retentions() {
        assert_eq!(pass_interval(Duration::from_secs(7 * 86_400)), Duration::from_secs(30));
        assert_eq!(pass_interval(Duration::from_secs(24 * 3600)), Duration::from_secs(30));
        assert_eq!(pass_interval(Duration::from_secs(3600)), Duration::from_secs(30));
        assert_eq!(pass_interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(pass_interval(Duration::ZERO), Duration::from_millis(100));
    }
}
