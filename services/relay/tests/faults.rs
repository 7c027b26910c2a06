//! Outages, poison rows, claims that outlive their lease, and crashes.

mod common;

use std::time::Duration;

use broker::publish::Publisher;
use common::*;
use outbox::claim::claim_batch;
use outbox::failures::{mark_dead, record_failures, Failure, Poison};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_costs_no_attempts_and_loses_nothing() {
    let db = migrated_database("relay_outage").await;
    let mut redis = test_support::PrivateRedis::start(true);
    let stream = test_support::unique_name("relay-outage");
    // One attempt allowed: were an outage counted against the rows, they would all go dead.
    let mut cfg = config(&db.url, &redis.url(), &stream);
    cfg.max_attempts = 1;
    cfg.poll_interval = Duration::from_millis(100);
    let relay = RunningRelay::start(cfg).await;

    append_spread(&db.pool, 10, 5).await;
    wait_until_published(&db.pool, 10, Duration::from_secs(20)).await;

    redis.kill();
    append_spread(&db.pool, 20, 5).await;
    let metrics_url = format!("http://{}/metrics", relay.addr);
    test_support::eventually("the relay backs off as a whole", Duration::from_secs(20), || async {
        let metrics = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        metrics.contains("outbox_broker_up 0\n").then_some(())
    })
    .await;
    let ready = reqwest::get(format!("http://{}/readyz", relay.addr)).await.expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.text().await.expect("body").contains("redis: not taking entries for"), "readyz says why");
    let health = reqwest::get(format!("http://{}/healthz", relay.addr)).await.expect("healthz");
    assert_eq!(health.status(), 200, "waiting for Redis is not a stall");
    // Several seconds of outage: still no attempt counted, nothing dead.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 0").await, 20);
    let metrics = reqwest::get(&metrics_url).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("outbox_publish_failures_total 0\n"), "no row failed:\n{metrics}");
    assert!(metrics.contains("outbox_broker_outages_total 1\n"), "{metrics}");
    let transient = test_support::sample(&metrics, "outbox_failures_total", r#"class="transient",source="redis""#);
    assert!(transient.is_some_and(|n| n > 0.0), "{metrics}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 10);

    redis.restart();
    wait_until_published(&db.pool, 30, Duration::from_secs(30)).await;
    let metrics = reqwest::get(&metrics_url).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("outbox_broker_up 1\n"), "{metrics}");
    let ready_url = format!("http://{}/readyz", relay.addr);
    test_support::eventually("ready again", Duration::from_secs(10), || async {
        (reqwest::get(&ready_url).await.ok()?.status() == 200).then_some(())
    })
    .await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published WHERE attempts > 0").await, 0);
    relay.stop().await;
    let ids = distinct_event_ids(&redis.url(), &stream).await;
    assert_eq!(ids.len(), 30, "every event is on the stream after Redis returns");
    let mut expected: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM outbox_published").fetch_all(&db.pool).await.expect("ids");
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_of_another_type_stops_the_relay_without_blaming_the_rows() {
    let db = migrated_database("relay_wrongtype").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-wrongtype");
    let mut conn = test_support::redis_connection().await;
    redis::cmd("SET").arg(&stream).arg("not a stream").query_async::<()>(&mut conn).await.expect("set");
    let mut cfg = config(&db.url, &redis, &stream);
    cfg.max_attempts = 1;
    let relay = RunningRelay::start(cfg).await;
    for i in 0..4 {
        append(&db.pool, &format!("o-{i}"), &order_payload("x")).await;
    }
    notify(&db.pool).await;
    let ready_url = format!("http://{}/readyz", relay.addr);
    test_support::eventually("readyz names the refusal", Duration::from_secs(20), || async {
        let body = reqwest::get(&ready_url).await.ok()?.text().await.ok()?;
        body.contains("WRONGTYPE").then_some(())
    })
    .await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 0").await, 4);
    // The key fixed, the same rows go out.
    redis::cmd("DEL").arg(&stream).query_async::<()>(&mut conn).await.expect("del");
    wait_until_published(&db.pool, 4, Duration::from_secs(30)).await;
    relay.stop().await;
    delete_stream(&redis, &stream).await;
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

    // Another worker may publish the healthy rows while the one that claimed the poison row
    // is still marking it dead.
    let (status, error): (String, Option<String>) =
        test_support::eventually("the poison row marked dead", Duration::from_secs(20), || async {
            let row: (String, Option<String>) =
                sqlx::query_as("SELECT status, last_error FROM outbox WHERE event_id = $1")
                    .bind(poison.event_id.to_string())
                    .fetch_one(&db.pool)
                    .await
                    .ok()?;
            (row.0 == "dead").then_some(row)
        })
        .await;
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
async fn a_claim_that_outlived_its_lease_cannot_touch_the_new_owners_rows() {
    let db = migrated_database("relay_fencing").await;
    for i in 0..3 {
        append(&db.pool, &format!("o-{i}"), &order_payload("x")).await;
    }
    let short = claim_pool(&db.url, Duration::from_millis(300)).await;
    let pool = claim_pool(&db.url, Duration::from_secs(30)).await;
    let mut a = claim_batch(claim_conn(&short).await, 10).await.expect("claim A");
    let a_rows = std::mem::take(&mut a.rows);
    assert_eq!(a_rows.len(), 3);
    let other = claim_batch(claim_conn(&pool).await, 10).await.expect("claim");
    assert_eq!((other.rows.len(), other.locked), (0, 0), "claimed rows are not claimed twice");
    other.rollback().await.expect("rollback");

    // A is paused past its lease: the database ends its transaction and B takes the rows.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = claim_batch(claim_conn(&pool).await, 10).await.expect("claim B");
    assert_eq!(b.rows.len(), 3, "an ended claim's rows are claimed again");

    // A wakes up and tries every kind of finish while B holds the rows.
    assert!(a.commit().await.is_err(), "a claim the database ended cannot be committed");
    let failure = |error: &str| -> Vec<Failure> {
        a_rows
            .iter()
            .map(|r| Failure {
                id: r.id,
                attempts: r.attempts,
                retry_in: Duration::from_secs(60),
                error: error.to_owned(),
            })
            .collect()
    };
    let poison: Vec<Poison> =
        a_rows.iter().map(|r| Poison { id: r.id, attempts: r.attempts, reason: "stale".to_owned() }).collect();
    assert!(record_failures(&pool, &failure("stale"), 1).await.expect("fail").is_empty(), "rows B holds are skipped");
    assert_eq!(mark_dead(&pool, &poison).await.expect("dead"), 0);

    // B's publish fails and B records it; A's stale outcome still changes nothing.
    b.rollback().await.expect("rollback B");
    assert_eq!(record_failures(&pool, &failure("redis: refused"), 10).await.expect("B's failure").len(), 3);
    assert!(record_failures(&pool, &failure("stale"), 1).await.expect("fail").is_empty(), "attempts moved on");
    assert_eq!(mark_dead(&pool, &poison).await.expect("dead"), 0);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 1 AND last_error = 'redis: refused'"
        )
        .await,
        3,
        "only B's outcome is recorded"
    );
}

#[tokio::test]
async fn a_committed_claim_moves_its_rows_and_a_rolled_back_one_leaves_them() {
    let db = migrated_database("relay_commit").await;
    for i in 0..4 {
        append(&db.pool, &format!("o-{i}"), &order_payload("x")).await;
    }
    let pool = claim_pool(&db.url, Duration::from_secs(30)).await;
    let claim = claim_batch(claim_conn(&pool).await, 2).await.expect("claim");
    assert_eq!(claim.rows.len(), 2);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 0, "nothing is visible before commit");
    claim.rollback().await.expect("rollback");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 4, "a rolled-back claim leaves its rows");
    let claim = claim_batch(claim_conn(&pool).await, 10).await.expect("claim");
    assert_eq!(claim.rows.len(), 4);
    claim.commit().await.expect("commit");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 4);
}

#[tokio::test]
async fn an_orders_later_events_wait_while_an_earlier_one_is_in_flight_or_backing_off() {
    let db = migrated_database("relay_order").await;
    let a1 = append(&db.pool, "a", &order_payload("a")).await;
    let a2 = append(&db.pool, "a", &order_payload("a")).await;
    let b1 = append(&db.pool, "b", &order_payload("b")).await;
    let pool = claim_pool(&db.url, Duration::from_secs(30)).await;
    let mut first = claim_batch(claim_conn(&pool).await, 1).await.expect("claim");
    assert_eq!(first.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(), [a1.event_id.to_string()]);
    let second = claim_batch(claim_conn(&pool).await, 10).await.expect("claim");
    assert_eq!(
        second.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(),
        [b1.event_id.to_string()],
        "a2 waits for a1, which is in flight"
    );
    assert_eq!(second.locked, 2, "a2 was locked, and left");
    second.rollback().await.expect("rollback");

    let a1_row = first.rows.remove(0);
    first.rollback().await.expect("rollback");
    let failure = [Failure {
        id: a1_row.id,
        attempts: a1_row.attempts,
        retry_in: Duration::from_secs(3600),
        error: "redis: refused".to_owned(),
    }];
    assert_eq!(record_failures(&pool, &failure, 10).await.expect("fail a1").len(), 1);
    let third = claim_batch(claim_conn(&pool).await, 10).await.expect("claim");
    assert_eq!(
        (third.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(), third.locked),
        (vec![b1.event_id.to_string()], 1),
        "a2 is not even locked while a1 backs off"
    );
    third.rollback().await.expect("rollback");

    sqlx::query("UPDATE outbox SET next_attempt_at = now() WHERE aggregate_id = 'a'")
        .execute(&db.pool)
        .await
        .expect("due");
    let fourth = claim_batch(claim_conn(&pool).await, 10).await.expect("claim");
    let got: Vec<(String, i64)> =
        fourth.rows.iter().filter(|r| r.aggregate_id == "a").map(|r| (r.event_id.clone(), r.seq)).collect();
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
    let claim = claim_batch(claim_conn(&db.pool).await, 10).await.expect("claim");
    let got: Vec<(String, i64)> = claim.rows.iter().map(|r| (r.event_id.clone(), r.seq)).collect();
    assert_eq!(got, [(a1.event_id.to_string(), 1), (a2.event_id.to_string(), 2)], "never a2 without a1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_xadd_and_commit_republishes() {
    let db = migrated_database("relay_crash").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-crash");
    let a = append(&db.pool, "o-1", &order_payload("o-1")).await;
    let b = append(&db.pool, "o-1", &order_payload("o-1")).await;

    // A relay claims and publishes, then hangs before committing; the database ends its claim
    // after the lease (a crashed relay's connection closes, which ends it at once).
    let crashed = claim_pool(&db.url, Duration::from_millis(300)).await;
    let claim = claim_batch(claim_conn(&crashed).await, 10).await.expect("claim");
    let entries: Vec<_> = claim.rows.iter().map(|r| r.to_entry(usize::MAX).expect("entry")).collect();
    Publisher::new(&redis, stream.clone()).expect("publisher").publish(&entries).await.expect("publish");
    std::mem::forget(claim);
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

#[tokio::test]
async fn one_relay_answers_a_notification_and_every_relay_answers_without_redis() {
    use broker::redis::target::RedisTarget;
    use relay::wake::Responder;
    let client = RedisTarget::new(&test_support::redis_url(), &[]).expect("redis url");
    let stream = test_support::unique_name("relay-answer");
    let mut first = Responder::new(client.clone(), "db", &stream);
    let mut second = Responder::new(client.clone(), "db", &stream);
    let mut other_outbox = Responder::new(client, "other_db", &stream);
    assert!(first.answers("42").await, "the first to hear it answers");
    assert!(!second.answers("42").await, "the second does not");
    assert!(second.answers("43").await);
    assert!(other_outbox.answers("42").await, "another outbox's event 42 is another event");
    assert!(first.answers("").await && second.answers("").await, "a notification naming no event wakes every relay");

    // Nothing listens on this port: the mark cannot be made, and the relay answers anyway.
    let unreachable = RedisTarget::new("redis://127.0.0.1:9/", &[]).expect("redis url");
    let mut lost = Responder::new(unreachable, "db", &stream);
    assert!(lost.answers("42").await, "without Redis every relay answers, as before");
}

#[tokio::test]
async fn a_redis_that_does_not_respond_holds_up_one_notification_not_each() {
    use broker::redis::target::RedisTarget;
    use relay::wake::Responder;
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let client = RedisTarget::new(&format!("redis://{addr}/"), &[]).expect("redis url");
    let mut responder = Responder::new(client, "db", "silent");
    assert!(responder.answers("1").await, "answered once the mark times out");
    let started = std::time::Instant::now();
    for id in 2..=20 {
        assert!(responder.answers(&id.to_string()).await);
    }
    // Each would wait for the connection's 1 s timeout if Redis were asked again.
    assert!(started.elapsed() < Duration::from_secs(3), "19 notifications took {:?}", started.elapsed());
    held.abort();
}
