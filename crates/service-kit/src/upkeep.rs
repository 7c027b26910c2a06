//! Keeping a service's busiest tables vacuumed and analyzed by the service itself.
//!
//! Queue-like tables (the outbox, its published copy, the consumer's checkpoints) turn over
//! their rows all the time. Left to autovacuum's defaults, or with autovacuum off, they fill
//! with dead rows that every scan must step over, and their statistics stay those of the
//! empty table the service started with, so cached plans keep scanning the whole table long
//! after it has grown. [`upkeep_loop`] checks the tables' activity counters every interval and
//! runs `VACUUM (ANALYZE)` or `ANALYZE` on a table whose counters passed a threshold, one
//! process at a time per table (an advisory lock), so several replicas never queue up behind
//! each other's vacuum.

use std::time::Duration;

use sqlx::{Executor, PgPool};

use crate::Shutdown;

/// Advisory lock namespace ("upke"); the second key is the table name's hash.
pub const LOCK_NAMESPACE: i32 = 0x7570_6b65;

/// Dead rows that make a table worth vacuuming: this many plus [`VACUUM_SHARE`] of its live
/// rows (autovacuum's default is 50 plus 20 %).
pub const VACUUM_MIN_DEAD: i64 = 1_000;
pub const VACUUM_SHARE: f64 = 0.2;
/// Rows written since the last analyze that make a table worth analyzing: this many plus
/// [`ANALYZE_SHARE`] of its live rows (autovacuum's default is 50 plus 10 %).
pub const ANALYZE_MIN_CHANGED: i64 = 500;
pub const ANALYZE_SHARE: f64 = 0.1;

/// The bound of one `VACUUM` or `ANALYZE`.
const UPKEEP_STATEMENT_TIMEOUT: &str = "SET statement_timeout = '30min'";

/// What one round did to one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Vacuumed,
    Analyzed,
    /// Another process held the table's upkeep lock.
    Skipped,
}

/// A table's activity counters, as `pg_stat_user_tables` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub live: i64,
    pub dead: i64,
    pub changed_since_analyze: i64,
}

impl Counters {
    /// What the table needs, if anything.
    pub fn due(&self) -> Option<Action> {
        let live = self.live.max(0) as f64;
        if self.dead as f64 >= VACUUM_MIN_DEAD as f64 + VACUUM_SHARE * live {
            Some(Action::Vacuumed)
        } else if self.changed_since_analyze as f64 >= ANALYZE_MIN_CHANGED as f64 + ANALYZE_SHARE * live {
            Some(Action::Analyzed)
        } else {
            None
        }
    }
}

/// Checks `tables` once and vacuums or analyzes those that need it. Returns what was done, per
/// table name. The statistics collector's counters lag writes by up to about a second.
pub async fn upkeep_once(pool: &PgPool, tables: &[&str]) -> Result<Vec<(String, Action)>, sqlx::Error> {
    let names: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
    let rows = sqlx::query!(
        r#"SELECT relname::text AS "table!", n_live_tup AS "live!", n_dead_tup AS "dead!",
                  n_mod_since_analyze AS "changed_since_analyze!"
           FROM pg_stat_user_tables WHERE relid = ANY($1::text[]::regclass[])"#,
        &names,
    )
    .fetch_all(pool)
    .await?;
    let mut done = Vec::new();
    for row in rows {
        let table = row.table;
        let counters = Counters { live: row.live, dead: row.dead, changed_since_analyze: row.changed_since_analyze };
        let Some(action) = counters.due() else { continue };
        let action = run_locked(pool, &table, action).await?;
        tracing::debug!(table, ?action, ?counters, "table upkeep");
        done.push((table, action));
    }
    Ok(done)
}

/// Runs `action` on `table` under its advisory lock, on one connection.
async fn run_locked(pool: &PgPool, table: &str, action: Action) -> Result<Action, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked =
        sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1, hashtext($2)) AS "locked!""#, LOCK_NAMESPACE, table)
            .fetch_one(&mut *conn)
            .await?;
    if !locked {
        return Ok(Action::Skipped);
    }
    // `table` comes from pg_stat_user_tables for a name the service passed in; quoting keeps it
    // one identifier. TRUNCATE false: shrinking the file needs an exclusive lock that would
    // stall writers for a moment; the freed space is reused by new rows instead.
    let ident = format!("\"{}\"", table.replace('"', "\"\""));
    let sql = match action {
        Action::Vacuumed => format!("VACUUM (ANALYZE, TRUNCATE false) {ident}"),
        _ => format!("ANALYZE {ident}"),
    };
    // A plain string runs as a simple query: VACUUM cannot be a prepared statement. A vacuum of
    // a large table may outlast the session's statement timeout, which is meant for the
    // service's own statements: it gets a bound of its own, then the session's again.
    let result = match conn.execute(UPKEEP_STATEMENT_TIMEOUT).await {
        Ok(_) => conn.execute(sql.as_str()).await,
        Err(e) => Err(e),
    };
    let reset = conn.execute("RESET statement_timeout").await;
    let unlocked = sqlx::query_scalar!("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_NAMESPACE, table)
        .fetch_one(&mut *conn)
        .await;
    if unlocked.is_err() || reset.is_err() {
        // The lock and the setting are session scoped: never hand back a connection that may
        // still hold either.
        conn.detach();
    }
    result.map(|_| action)
}

/// Runs [`upkeep_once`] every `every` until shutdown. A zero interval disables upkeep.
pub async fn upkeep_loop(pool: PgPool, tables: &'static [&'static str], every: Duration, shutdown: Shutdown) {
    if every.is_zero() {
        return;
    }
    let mut failures = 0_u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let round = tokio::select! {
            () = shutdown.cancelled() => return,
            round = upkeep_once(&pool, tables) => round,
        };
        match round {
            Ok(done) => {
                failures = 0;
                for (table, action) in done.iter().filter(|(_, a)| *a != Action::Skipped) {
                    tracing::info!(table, ?action, "table upkeep");
                }
            }
            Err(e) => {
                failures += 1;
                // A role that may not vacuum (not the tables' owner) gets an error every round;
                // say so once at warn level, then quietly.
                if failures == 1 {
                    tracing::warn!(error = %e, "table upkeep failed; autovacuum is left to keep up");
                } else {
                    tracing::debug!(error = %e, "table upkeep failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let c = |live, dead, changed| Counters { live, dead, changed_since_analyze: changed }.due();
        assert_eq!(c(0, 0, 0), None);
        assert_eq!(c(0, 999, 0), None);
        assert_eq!(c(0, 1_000, 0), Some(Action::Vacuumed));
        // A large table needs proportionally more dead rows.
        assert_eq!(c(100_000, 20_000, 0), None);
        assert_eq!(c(100_000, 21_000, 0), Some(Action::Vacuumed));
        assert_eq!(c(0, 0, 499), None);
        assert_eq!(c(0, 0, 500), Some(Action::Analyzed));
        assert_eq!(c(100_000, 0, 10_499), None);
        assert_eq!(c(100_000, 0, 10_500), Some(Action::Analyzed));
        // Vacuum analyzes too, so it wins.
        assert_eq!(c(0, 5_000, 5_000), Some(Action::Vacuumed));
    }
}
