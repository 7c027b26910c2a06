//! Crashes, redelivery, shutdown and unreachable dependencies.

use std::time::Duration;

use domain::OrderId;
use sqlx::Connection;

use crate::common::{created, Harness, Running};

#[tokio::test]
async fn a_crash_after_commit_before_ack_is_finished_by_another_replica_without_a_second_effect() {
    let h = Harness::new("crash").await;
    h.set_stock("SKU-1", 100).await;
    for _ in 0..10 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    }
    let (config, no_ack) = h.config_without_ack("doomed").await;
    let doomed = Running::start(config).await;
    h.applied(10).await;
    no_ack.cut();
    doomed.stop().await;
    // Committed but not acknowledged.
    assert_eq!(h.stock("SKU-1").await, (100, 10));
    assert_eq!(h.group_info("pending").await.as_deref(), Some("10"));

    // More work arrives; a live replica claims the dead one's entries once they are idle.
    h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    let mut config = h.config("survivor");
    config.claim_min_idle = Duration::from_secs(1);
    let survivor = Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (100, 11), "redelivery had no second effect");
    assert_eq!(h.count("SELECT count(*) FROM processed_messages").await, 11);
    let metrics = reqwest::get(survivor.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="duplicate"} 10"#), "{metrics}");
    survivor.stop().await;
}

#[tokio::test]
async fn a_restarted_replica_finishes_its_own_pending_entries_first() {
    let h = Harness::new("restart").await;
    h.set_stock("SKU-1", 100).await;
    for _ in 0..5 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 2)])).await;
    }
    let (config, no_ack) = h.config_without_ack("same").await;
    let crashed = Running::start(config).await;
    h.applied(5).await;
    no_ack.cut();
    crashed.stop().await;
    assert_eq!(h.group_info("pending").await.as_deref(), Some("5"));
    // Same name, default (long) CLAIM_MIN_IDLE: it re-reads its own pending list at start.
    let again = h.start("same").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (100, 10));
    again.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_acknowledges_the_work_in_flight() {
    let h = Harness::new("graceful").await;
    h.set_stock("SKU-1", 1_000_000).await;
    for _ in 0..3_000 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    }
    let mut config = h.config("leaving");
    config.batch_size = 50;
    let running = Running::start(config).await;
    test_support::eventually("some work done", Duration::from_secs(30), || async {
        (h.count("SELECT count(*) FROM processed_messages").await > 0).then_some(())
    })
    .await;
    running.stop().await;
    // Everything this replica read was applied and acknowledged: nothing left pending.
    assert_eq!(h.group_info("pending").await.as_deref(), Some("0"));
    let read: i64 = h.group_info("entries-read").await.unwrap().parse().unwrap();
    assert_eq!(h.count("SELECT count(*) FROM processed_messages").await, read);
    assert_eq!(h.stock("SKU-1").await.1, read);
}

#[tokio::test]
async fn without_postgres_it_reports_not_ready_and_still_stops_cleanly() {
    let h = Harness::new("nopg").await;
    let mut config = h.config("c1");
    // Nothing listens on port 1.
    config.database_url = "postgres://postgres@127.0.0.1:1/nowhere".to_owned();
    let running = Running::start(config).await;
    let health = reqwest::get(running.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(running.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("postgres"));
    running.stop().await;
}

#[tokio::test]
async fn rows_locked_by_a_frozen_session_are_waited_out_not_counted_against_the_entries() {
    let h = Harness::new("frozenlock").await;
    h.set_stock("SKU-1", 100).await;
    // A session that locks the stock row in a transaction and then stops talking, as a replica
    // frozen mid-batch does. Its server-side idle timeout ends it after 2 s.
    let mut frozen = sqlx::PgConnection::connect_with(
        &h.db
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .options([("idle_in_transaction_session_timeout", "2000")]),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut frozen).await.unwrap();
    sqlx::query("SELECT * FROM inventory WHERE sku = 'SKU-1' FOR UPDATE").execute(&mut frozen).await.unwrap();
    let locked_at = std::time::Instant::now();
    for _ in 0..20 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    }
    let mut config = h.config("c1");
    // Lock waits end after 250 ms: the batch is retried whole until the lock is gone.
    config.claim_min_idle = Duration::from_secs(1);
    config.max_deliveries = 1;
    let running = Running::start(config).await;
    h.drained().await;
    assert!(locked_at.elapsed() >= Duration::from_secs(2), "applied only once the frozen session was ended");
    assert_eq!(h.stock("SKU-1").await, (100, 20));
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(h.count("SELECT count(*) FROM entry_failures").await, 0);
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    let transient = test_support::sample(&metrics, "consumer_failures_total", r#"class="transient",source="postgres""#);
    assert!(transient.is_some_and(|n| n > 0.0), "{metrics}");
    assert_eq!(reqwest::get(running.url("/healthz")).await.unwrap().status(), 200);
    running.stop().await;
}
