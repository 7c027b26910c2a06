//! Delivery guarantees against the shared Postgres and Redis.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rand::Rng;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_late_is_still_published() {
    let db = migrated_database("relay_late").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-late");
    let relay = RunningRelay::start(config(&db.url, &redis, &stream)).await;

    // A writer takes an outbox id, then keeps its transaction open.
    let mut late = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = late.begin().await.expect("begin");
    let late_event = outbox::append(
        &mut tx,
        outbox::NewEvent {
            aggregate_type: "order",
            aggregate_id: "late-order",
            event_type: "OrderConfirmed",
            payload: &order_payload("late-order"),
            occurred_at: chrono::Utc::now(),
            notify: false,
        },
    )
    .await
    .expect("append");

    // Rows with higher ids commit and are published meanwhile.
    for i in 0..5 {
        append(&db.pool, &format!("early-{i}"), &order_payload("x")).await;
    }
    notify(&db.pool).await;
    wait_until_published(&db.pool, 5, Duration::from_secs(20)).await;

    tx.commit().await.expect("commit late row");
    notify(&db.pool).await;
    wait_until_published(&db.pool, 6, Duration::from_secs(20)).await;
    let entries = read_stream(&redis, &stream).await;
    assert_eq!(entries.len(), 6);
    assert_eq!(
        entries.last().map(|e| e.event_id),
        Some(late_event.event_id),
        "the late row is published after the others"
    );
    relay.stop().await;
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backing_off_row_is_published_when_it_is_due_not_at_the_next_poll() {
    let db = migrated_database("relay_due").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-due");
    append(&db.pool, "due-order", &order_payload("due-order")).await;
    // As a failed publish leaves a row: one attempt counted, the next one 2 s away.
    sqlx::query("UPDATE outbox SET attempts = 1, next_attempt_at = now() + interval '2 seconds'")
        .execute(&db.pool)
        .await
        .expect("back off");
    let backing_off = std::time::Instant::now();
    let mut config = config(&db.url, &redis, &stream);
    config.poll_interval = Duration::from_secs(60);
    let relay = RunningRelay::start(config).await;
    // Nothing notifies; only the due time can wake the relay before its minute-long poll.
    wait_until_published(&db.pool, 1, Duration::from_secs(15)).await;
    let took = backing_off.elapsed();
    assert!(took >= Duration::from_millis(1900), "published before it was due: {took:?}");
    relay.stop().await;
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_publish_every_event_once_in_seq_order_per_order() {
    const ORDERS: usize = 1000;
    const EVENTS: usize = 20_000;
    let db = migrated_database("relay_three").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-three");
    let mut cfg = config(&db.url, &redis, &stream);
    // Small batches so the relays interleave and contend for the same orders.
    cfg.batch_size = 200;
    let relays = [
        RunningRelay::start(cfg.clone()).await,
        RunningRelay::start(cfg.clone()).await,
        RunningRelay::start(cfg.clone()).await,
    ];

    // Writers append to random orders concurrently while the relays run.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                for _ in 0..EVENTS / 8 {
                    let order = format!("order-{}", rand::rng().random_range(0..ORDERS));
                    append(&pool, &order, &order_payload(&order)).await;
                    if rand::rng().random_ratio(1, 50) {
                        notify(&pool).await;
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    notify(&db.pool).await;
    wait_until_published(&db.pool, EVENTS as i64, Duration::from_secs(120)).await;
    for r in relays {
        r.stop().await;
    }

    let entries = read_stream(&redis, &stream).await;
    let expected: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT aggregate_id, last_seq FROM outbox_counters")
            .fetch_all(&db.pool)
            .await
            .expect("sequences")
            .into_iter()
            .collect();
    assert_eq!(expected.values().sum::<i64>(), EVENTS as i64);
    // With no faults nothing is published twice, and per order the seqs are 1, 2, 3 … on the stream.
    assert_eq!(entries.len(), EVENTS, "each event exactly once");
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for e in &entries {
        let last = last_seq.entry(e.aggregate_id.as_str()).or_insert(0);
        assert_eq!(e.seq, *last + 1, "order {} went {} -> {}", e.aggregate_id, last, e.seq);
        *last = e.seq;
    }
    for (order, seq) in &expected {
        assert_eq!(last_seq.get(order.as_str()), Some(seq), "every event of {order} is on the stream");
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 0);
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relay_publishes_a_notified_event_and_exports_metrics() {
    let db = migrated_database("relay_idle").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-idle");
    let mut cfg = config(&db.url, &redis, &stream);
    // A poll far in the future: only the notification can wake the relay in time.
    cfg.poll_interval = Duration::from_secs(3600);
    // `/metrics` on an admin listener apart, as with the defaults (9100 and 9101).
    cfg.admin_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let relay = RunningRelay::start(cfg).await;
    let base = format!("http://{}", relay.addr);
    let admin = format!("http://{}", relay.admin.expect("an admin listener apart"));
    test_support::eventually("relay ready", Duration::from_secs(20), || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // Give the listener time to subscribe; the notification must reach a LISTENing relay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let appended = append(&db.pool, "idle-order", &order_payload("idle-order")).await;
    notify(&db.pool).await;
    let entries = test_support::eventually("event on the stream", Duration::from_secs(20), || async {
        let entries = read_stream(&redis, &stream).await;
        (!entries.is_empty()).then_some(entries)
    })
    .await;
    assert_eq!(entries[0].event_id, appended.event_id);
    assert_eq!(entries[0].seq, 1);

    // The counters move once the row is recorded, just after the XADD.
    wait_until_published(&db.pool, 1, Duration::from_secs(20)).await;
    assert_eq!(reqwest::get(format!("{base}/metrics")).await.expect("metrics").status(), 404);
    assert_eq!(reqwest::get(format!("{admin}/readyz")).await.expect("readyz").status(), 200);
    let metrics = reqwest::get(format!("{admin}/metrics")).await.expect("metrics").text().await.expect("body");
    for name in [
        "outbox_published_total 1",
        "outbox_publish_failures_total 0",
        "outbox_dead_lettered_total 0",
        "outbox_publish_lag_seconds_count 1",
        "outbox_pending",
        "outbox_in_flight 0",
        "outbox_dead",
        "outbox_oldest_pending_age_seconds",
    ] {
        assert!(metrics.contains(name), "/metrics lacks `{name}`:\n{metrics}");
    }
    relay.stop().await;
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_work_and_leaves_nothing_claimed() {
    let db = migrated_database("relay_shutdown").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-shutdown");
    let mut cfg = config(&db.url, &redis, &stream);
    cfg.batch_size = 50;
    let relay = RunningRelay::start(cfg).await;
    for i in 0..500 {
        append(&db.pool, &format!("o-{}", i % 20), &order_payload("x")).await;
    }
    notify(&db.pool).await;
    // Stop mid-drain: whatever was claimed is finished, nothing stays claimed.
    relay.stop().await;
    let free = count(&db.pool, "SELECT count(*) FROM (SELECT id FROM outbox FOR UPDATE SKIP LOCKED) f").await;
    let left = count(&db.pool, "SELECT count(*) FROM outbox").await;
    assert_eq!(free, left, "no row is left locked by a stopped relay");
    let published = count(&db.pool, "SELECT count(*) FROM outbox_published").await;
    assert_eq!(
        stream_len(&redis, &stream).await as i64,
        published,
        "every recorded row is on the stream and vice versa"
    );

    // A new relay picks up the rest.
    let relay = RunningRelay::start(config(&db.url, &redis, &stream)).await;
    wait_until_published(&db.pool, 500, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(stream_len(&redis, &stream).await, 500);
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_notification_is_answered_by_one_relay_not_by_a_claim_per_relay() {
    const EVENTS: usize = 60;
    let db = migrated_database("relay_trickle").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-trickle");
    let cfg = config(&db.url, &redis, &stream);
    let relays = [RunningRelay::start(cfg.clone()).await, RunningRelay::start(cfg).await];
    // Both relays listening and past their first claims.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = empty_claims(&relays).await;

    // Each event's transaction notifies at its commit, as an order-service write at rest does.
    for i in 0..EVENTS {
        append_with(&db.pool, &format!("o-{i}"), &order_payload("x"), true).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_until_published(&db.pool, EVENTS as i64, Duration::from_secs(20)).await;

    // Both relays hear every notification; were both to answer it, one of the two claims
    // would find nothing, every time.
    let wasted = empty_claims(&relays).await - before;
    assert!(wasted < (EVENTS / 4) as f64, "{wasted} empty claims for {EVENTS} events");
    for relay in relays {
        relay.stop().await;
    }
    delete_stream(&redis, &stream).await;
}

async fn empty_claims(relays: &[RunningRelay]) -> f64 {
    futures::future::join_all(relays.iter().map(|r| counter(r, "outbox_empty_claims"))).await.iter().sum()
}
