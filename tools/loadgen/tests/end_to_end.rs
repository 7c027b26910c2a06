//! End-to-end latency is read from the real schemas: the orders database's outbox tables and
//! the inventory database's `processed_messages`.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

static INVENTORY_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/inventory");

async fn publish(pool: &PgPool, id: i64, event_id: &str, order: &str, seq: i64, created_at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, \
         occurred_at, attempts, created_at, tenant_id) VALUES ($1, $2, 'order', $3, $4, 'OrderCreated', '{}', $5, 1, $5, 'default')",
    )
    .bind(id)
    .bind(event_id)
    .bind(order)
    .bind(seq)
    .bind(created_at)
    .execute(pool)
    .await
    .expect("insert published event");
}

async fn pending(pool: &PgPool, event_id: &str, order: &str, seq: i64, created_at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, created_at) \
         VALUES ($1, 'order', $2, $3, 'OrderConfirmed', '{}', $4, $4)",
    )
    .bind(event_id)
    .bind(order)
    .bind(seq)
    .bind(created_at)
    .execute(pool)
    .await
    .expect("insert pending event");
}

async fn applied(pool: &PgPool, event_id: &str, order: &str, seq: i64, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO processed_messages (event_id, aggregate_id, seq, event_type, processed_at) \
         VALUES ($1, $2, $3, 'OrderCreated', $4)",
    )
    .bind(event_id)
    .bind(order)
    .bind(seq)
    .bind(at)
    .execute(pool)
    .await
    .expect("insert processed message");
}

#[tokio::test]
async fn latency_is_applied_minus_written_for_the_runs_events_only() {
    let orders = test_support::fresh_database("loadgen_orders").await;
    let inventory = test_support::fresh_database("loadgen_inventory").await;
    outbox::MIGRATOR.run(&orders.pool).await.expect("orders migrations");
    INVENTORY_MIGRATOR.run(&inventory.pool).await.expect("inventory migrations");

    let t0 = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z").expect("time").with_timezone(&Utc);
    let ms = TimeDelta::milliseconds;
    publish(&orders.pool, 1, "ev-a1", "order-a", 1, t0).await;
    publish(&orders.pool, 2, "ev-a2", "order-a", 2, t0 + ms(100)).await;
    pending(&orders.pool, "ev-b1", "order-b", 1, t0 + ms(200)).await;
    // Another run's order: applied very late, must not count.
    publish(&orders.pool, 3, "ev-c1", "order-c", 1, t0).await;
    applied(&inventory.pool, "ev-a1", "order-a", 1, t0 + ms(3)).await;
    applied(&inventory.pool, "ev-a2", "order-a", 2, t0 + ms(107)).await;
    applied(&inventory.pool, "ev-c1", "order-c", 1, t0 + ms(60_000)).await;

    let ids = vec!["order-a".to_owned(), "order-b".to_owned()];
    let shutdown = CancellationToken::new();
    let e = loadgen::e2e::measure(&orders.url, &inventory.url, &ids, Duration::from_millis(300), &shutdown)
        .await
        .expect("measure");
    assert_eq!((e.events, e.applied), (3, 2), "order-b's event is not applied yet");
    let l = e.latency.expect("two latencies");
    assert_eq!(l.count, 2);
    assert!((l.p50_ms - 3.0).abs() < 0.01, "{l:?}");
    assert!((l.max_ms - 7.0).abs() < 0.01, "{l:?}");

    // The measurement waits for events still on their way.
    let late = inventory.pool.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        applied(&late, "ev-b1", "order-b", 1, t0 + ms(205)).await;
    });
    let e = loadgen::e2e::measure(&orders.url, &inventory.url, &ids, Duration::from_secs(30), &shutdown)
        .await
        .expect("measure");
    writer.await.expect("writer");
    assert_eq!((e.events, e.applied), (3, 3));
    let l = e.latency.expect("three latencies");
    assert!((l.max_ms - 7.0).abs() < 0.01, "{l:?}");
    assert!((l.mean_ms - 5.0).abs() < 0.01, "{l:?}");
}

#[tokio::test]
async fn an_unreachable_database_is_an_error_not_a_hang() {
    let shutdown = CancellationToken::new();
    let closed = "postgres://postgres@127.0.0.1:1/none";
    let result = loadgen::e2e::measure(closed, closed, &["x".to_owned()], Duration::from_secs(1), &shutdown).await;
    assert!(result.is_err());
}
