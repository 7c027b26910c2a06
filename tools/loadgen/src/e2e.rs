//! End-to-end latency of the run's events, from the databases' own records.
//!
//! For every event of the orders this run created, the orders database knows when the
//! writing transaction ran (`outbox`/`outbox_published.created_at`) and the inventory database
//! knows when the consumer applied it (`processed_messages.processed_at`). Both timestamps come
//! from the same Postgres clock, so no clock skew enters the difference and nothing is guessed.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::stats::{new_histogram, LatencySummary};

/// Keeps each array parameter to a size Postgres plans well.
const CHUNK: usize = 5_000;

#[derive(Debug, Clone, Serialize)]
pub struct EndToEnd {
    /// Events the run's orders wrote.
    pub events: u64,
    /// Of those, applied by the consumer within the wait.
    pub applied: u64,
    /// `created_at` (orders DB) → `processed_at` (inventory DB), per applied event.
    pub latency: Option<LatencySummary>,
}

/// Waits (up to `wait`) for the consumer to apply every event of `order_ids`, then measures.
pub async fn measure(
    orders_db: &str,
    inventory_db: &str,
    order_ids: &[String],
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<EndToEnd, sqlx::Error> {
    let mut orders = PgConnection::connect(orders_db).await?;
    let mut inventory = PgConnection::connect(inventory_db).await?;

    let mut written: HashMap<String, DateTime<Utc>> = HashMap::with_capacity(order_ids.len() * 2);
    for chunk in order_ids.chunks(CHUNK) {
        let rows = sqlx::query!(
            r#"SELECT event_id AS "event_id!", created_at AS "created_at!" FROM outbox_published
               WHERE aggregate_id = ANY($1)
               UNION ALL SELECT event_id, created_at FROM outbox WHERE aggregate_id = ANY($1)"#,
            chunk,
        )
        .fetch_all(&mut orders)
        .await?;
        written.extend(rows.into_iter().map(|r| (r.event_id, r.created_at)));
    }
    let event_ids: Vec<String> = written.keys().cloned().collect();

    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let applied = count_applied(&mut inventory, &event_ids).await?;
        if applied as usize >= event_ids.len() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }

    let mut histogram = new_histogram();
    let mut applied = 0;
    for chunk in event_ids.chunks(CHUNK) {
        let rows =
            sqlx::query!("SELECT event_id, processed_at FROM processed_messages WHERE event_id = ANY($1)", chunk)
                .fetch_all(&mut inventory)
                .await?;
        for row in rows {
            if let Some(created_at) = written.get(&row.event_id) {
                applied += 1;
                histogram.saturating_record(latency_micros(*created_at, row.processed_at));
            }
        }
    }
    orders.close().await.ok();
    inventory.close().await.ok();
    Ok(EndToEnd { events: event_ids.len() as u64, applied, latency: LatencySummary::of(&histogram) })
}

async fn count_applied(inventory: &mut PgConnection, event_ids: &[String]) -> Result<i64, sqlx::Error> {
    let mut total = 0;
    for chunk in event_ids.chunks(CHUNK) {
        total += sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM processed_messages WHERE event_id = ANY($1)"#,
            chunk,
        )
        .fetch_one(&mut *inventory)
        .await?;
    }
    Ok(total)
}

/// Microseconds from `from` to `to`, at least 1 (the histogram's floor).
fn latency_micros(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_microseconds().unwrap_or(i64::MAX)).unwrap_or(0).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_the_difference_in_micros_never_below_one() {
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").expect("time").with_timezone(&Utc);
        assert_eq!(latency_micros(t, t + chrono::Duration::microseconds(2_500)), 2_500);
        assert_eq!(latency_micros(t, t), 1);
        assert_eq!(latency_micros(t + chrono::Duration::seconds(1), t), 1);
    }
}
