//! Outages, poison rows, expired leases and crashes.

mod common;

use std::time::Duration;

use common::*;
use relay::claim::claim_batch;
use relay::finish::{mark_dead, mark_published, record_failures, release, Failure};
use relay::publish::Publisher;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_records_backoff_and_loses_nothing() {
    let db = migrated_database("relay_outage").await;
    let mut redis = test_support::PrivateRedis::start(true);
    let stream = test_support::unique_name("relay-outage");
    let mut cfg = config(&db.url, &redis.url(), &stream);
    cfg.backoff_base = Duration::from_millis(200);
    cfg.backoff_max = Duration::from_secs(1);
    cfg.poll_interval = Duration::from_millis(100);
    cfg.max_attempts = 1000;
    let relay = RunningRelay::start(cfg).await;

    for i in 0..10 {
        append(&db.pool, &format!("o-{}", i % 5), &order_payload("x")).await;
    }
    notify(&db.pool).await;
    wait_until_published(&db.pool, 10, Duration::from_secs(20)).await;

    redis.kill();
    for i in 0..20 {
        append(&db.pool, &format!("o-{}", i % 5), &order_payload("x")).await;
    }
    notify(&db.pool).await;
    test_support::eventually("failed attempts recorded", Duration::from_secs(20), || async {
        let recorded = count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE attempts >= 1 AND last_error LIKE 'redis:%' AND next_attempt_at > created_at",
        )
        .await;
        (recorded == 20).then_some(())
    })
    .await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE status = 'pending'").await,
        20,
        "nothing lost or dead"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 10);
    let metrics =
        reqwest::get(format!("http://{}/metrics", relay.addr)).await.expect("metrics").text().await.expect("body");
    assert!(!metrics.contains("outbox_publish_failures_total 0\n"), "failures are counted:\n{metrics}");
    let ready = reqwest::get(format!("http://{}/readyz", relay.addr)).await.expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);

    redis.restart();
    wait_until_published(&db.pool, 30, Duration::from_secs(30)).await;
    relay.stop().await;
    let entries = read_stream(&redis.url(), &stream).await;
    let mut ids: Vec<_> = entries.iter().map(|e| e.event_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30, "every event is on the stream after Redis returns");
    let mut expected: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM outbox_published").fetch_all(&db.pool).await.expect("ids");
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_goes_dead_and_other_orders_keep_flowing() {
    let db = migrated_database("relay_poison").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-poison");
    let mut cfg = config(&db.url, &redis, &stream);
    cfg.max_payload_bytes = 200;
    let relay = RunningRelay::start(cfg).await;

    let big = serde_json::json!({ "order_id": "poisoned", "note": "x".repeat(500) }).to_string();
    let poison = append(&db.pool, "poisoned", &big).await;
    let blocked = append(&db.pool, "poisoned", &order_payload("poisoned")).await;
    for i in 0..10 {
        append(&db.pool, &format!("healthy-{i}"), &order_payload("healthy")).await;
    }
    notify(&db.pool).await;
    wait_until_published(&db.pool, 10, Duration::from_secs(20)).await;

    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, last_error FROM outbox WHERE event_id = $1")
            .bind(poison.event_id.to_string())
            .fetch_one(&db.pool)
            .await
            .expect("poison row");
    assert_eq!(status, "dead");
    assert!(error.as_deref().is_some_and(|e| e.contains("over the limit of 200")), "reason recorded: {error:?}");
    // The poisoned order's later event waits behind its dead predecessor (seq order).
    let blocked_status: String = sqlx::query_scalar("SELECT status FROM outbox WHERE event_id = $1")
        .bind(blocked.event_id.to_string())
        .fetch_one(&db.pool)
        .await
        .expect("blocked row");
    assert_eq!(blocked_status, "pending");
    let entries = read_stream(&redis, &stream).await;
    assert_eq!(entries.len(), 10);
    assert!(entries.iter().all(|e| e.aggregate_id.starts_with("healthy-")));
    let metrics =
        reqwest::get(format!("http://{}/metrics", relay.addr)).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("outbox_dead_lettered_total 1\n"), "{metrics}");
    relay.stop().await;
    delete_stream(&redis, &stream).await;
}

#[tokio::test]
async fn an_expired_lease_cannot_touch_the_new_owners_rows() {
    let db = migrated_database("relay_fencing").await;
    for i in 0..3 {
        append(&db.pool, &format!("o-{i}"), &order_payload("x")).await;
    }
    let a = claim_batch(&db.pool, Duration::from_millis(200), 10).await.expect("claim A");
    assert_eq!(a.rows.len(), 3);
    assert_eq!(
        claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim").rows.len(),
        0,
        "leased rows are not claimed twice"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim B");
    assert_eq!(b.rows.len(), 3, "an expired lease is claimed again");

    // The paused owner of A wakes up and tries every kind of finish.
    let ids: Vec<i64> = a.rows.iter().map(|r| r.id).collect();
    assert_eq!(mark_published(&db.pool, a.token, &ids).await.expect("mark"), 0);
    let failures: Vec<Failure> = ids.iter().map(|&id| Failure { id, retry_in: Duration::from_secs(60) }).collect();
    assert!(record_failures(&db.pool, a.token, &failures, "stale", 1).await.expect("fail").is_empty());
    let dead: Vec<(i64, String)> = ids.iter().map(|&id| (id, "stale".to_owned())).collect();
    assert_eq!(mark_dead(&db.pool, a.token, &dead).await.expect("dead"), 0);
    assert_eq!(release(&db.pool, a.token, &ids).await.expect("release"), 0);
    let owned_by_b = count(
        &db.pool,
        &format!(
            "SELECT count(*) FROM outbox WHERE lease_owner = '{}' AND status = 'pending' AND attempts = 0",
            b.token
        ),
    )
    .await;
    assert_eq!(owned_by_b, 3, "B still owns untouched rows");
    assert_eq!(mark_published(&db.pool, b.token, &ids).await.expect("mark B"), 3);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 3);
}

#[tokio::test]
async fn an_orders_later_events_wait_while_an_earlier_one_is_leased_or_backing_off() {
    let db = migrated_database("relay_order").await;
    let a1 = append(&db.pool, "a", &order_payload("a")).await;
    let a2 = append(&db.pool, "a", &order_payload("a")).await;
    let b1 = append(&db.pool, "b", &order_payload("b")).await;
    let first = claim_batch(&db.pool, Duration::from_secs(30), 1).await.expect("claim");
    assert_eq!(first.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(), [a1.event_id.to_string()]);
    let second = claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim");
    assert_eq!(
        second.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(),
        [b1.event_id.to_string()],
        "a2 waits for a1"
    );
    let failure = [Failure { id: first.rows[0].id, retry_in: Duration::from_secs(3600) }];
    record_failures(&db.pool, first.token, &failure, "redis: down", 10).await.expect("fail a1");
    let third = claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim");
    assert!(third.rows.is_empty(), "a2 waits while a1 backs off");
    sqlx::query("UPDATE outbox SET next_attempt_at = now() WHERE aggregate_id = 'a'")
        .execute(&db.pool)
        .await
        .expect("due");
    let fourth = claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim");
    let got: Vec<(String, i64)> = fourth.rows.iter().map(|r| (r.event_id.clone(), r.seq)).collect();
    assert_eq!(got, [(a1.event_id.to_string(), 1), (a2.event_id.to_string(), 2)], "both, in seq order, once a1 is due");
}

#[tokio::test]
async fn a_fresh_row_stamped_after_the_claim_began_still_goes_out_before_its_successor() {
    // A writer whose transaction started after the claim's began, and committed before the
    // claim's snapshot, leaves a row whose default next_attempt_at is later than the claim's
    // now(). Its successor, from a writer that started earlier, must not overtake it.
    let db = migrated_database("relay_fresh").await;
    let a1 = append(&db.pool, "a", &order_payload("a")).await;
    let a2 = append(&db.pool, "a", &order_payload("a")).await;
    sqlx::query("UPDATE outbox SET next_attempt_at = now() + interval '1 hour' WHERE seq = 1")
        .execute(&db.pool)
        .await
        .expect("stamp a1 late");
    let claim = claim_batch(&db.pool, Duration::from_secs(30), 10).await.expect("claim");
    let got: Vec<(String, i64)> = claim.rows.iter().map(|r| (r.event_id.clone(), r.seq)).collect();
    assert_eq!(got, [(a1.event_id.to_string(), 1), (a2.event_id.to_string(), 2)], "never a2 without a1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_xadd_and_marking_republishes_after_the_lease() {
    let db = migrated_database("relay_crash").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-crash");
    let a = append(&db.pool, "o-1", &order_payload("o-1")).await;
    let b = append(&db.pool, "o-1", &order_payload("o-1")).await;

    // A relay claims and publishes, then dies before recording anything.
    let claim = claim_batch(&db.pool, Duration::from_millis(500), 10).await.expect("claim");
    let entries: Vec<_> = claim.rows.iter().map(|r| r.to_entry(usize::MAX).expect("entry")).collect();
    Publisher::new(&redis, stream.clone()).expect("publisher").publish(&entries).await.expect("publish");
    drop(claim);
    assert_eq!(stream_len(&redis, &stream).await, 2);

    let mut cfg = config(&db.url, &redis, &stream);
    cfg.poll_interval = Duration::from_millis(100);
    let relay = RunningRelay::start(cfg).await;
    wait_until_published(&db.pool, 2, Duration::from_secs(20)).await;
    relay.stop().await;
    let ids: Vec<_> = read_stream(&redis, &stream).await.into_iter().map(|e| (e.event_id, e.seq)).collect();
    assert_eq!(ids, [(a.event_id, 1), (b.event_id, 2), (a.event_id, 1), (b.event_id, 2)], "published again, in order");
    delete_stream(&redis, &stream).await;
}
