//! What the consumer keeps bounded in Redis: the group's list of consumers, the dead-letter
//! stream; and what it does not let pass silently: pending entries gone from the stream.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::Value;

use domain::OrderId;

use crate::common::{created, Harness, Running};

fn junk(i: usize) -> Vec<(String, Vec<u8>)> {
    vec![("junk".to_owned(), i.to_string().into_bytes())]
}

/// The group's consumers: name → pending.
async fn consumers(h: &Harness) -> Vec<(String, i64)> {
    let mut conn = h.redis.clone();
    let reply: Value =
        redis::cmd("XINFO").arg("CONSUMERS").arg(&h.stream).arg(&h.group).query_async(&mut conn).await.unwrap();
    let Value::Array(list) = reply else { return Vec::new() };
    list.into_iter()
        .filter_map(|c| {
            let Value::Array(flat) = c else { return None };
            let mut name = None;
            let mut pending = None;
            for kv in flat.chunks(2) {
                match (&kv[0], &kv[1]) {
                    (Value::BulkString(k), Value::BulkString(v)) if k == b"name" => {
                        name = Some(String::from_utf8_lossy(v).into_owned());
                    }
                    (Value::BulkString(k), Value::Int(n)) if k == b"pending" => pending = Some(*n),
                    _ => {}
                }
            }
            Some((name?, pending?))
        })
        .collect()
}

/// Reads `n` new entries as `consumer`; their ids.
async fn read_as(h: &Harness, consumer: &str, n: usize) -> Vec<String> {
    let mut conn = h.redis.clone();
    broker::redis::group::read_group(&mut conn, &h.stream, &h.group, consumer, ">", n as u32, None)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect()
}

#[tokio::test]
async fn consumers_that_left_are_removed_and_one_holding_entries_stays() {
    let h = Harness::new("departed").await;
    let mut conn = h.redis.clone();
    broker::redis::group::ensure_group(&mut conn, &h.stream, &h.group).await.unwrap();
    for i in 0..2 {
        h.xadd_fields(&h.stream, &junk(i)).await;
    }
    // Two replicas long gone: one acknowledged all it read, one left an entry pending.
    let done = read_as(&h, "gone-empty", 1).await;
    broker::redis::group::ack(&mut conn, &h.stream, &h.group, &[done[0].as_str()]).await.unwrap();
    let held = read_as(&h, "gone-holding", 1).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let mut config = h.config("c1");
    config.departed_after = Duration::from_secs(1);
    let running = Running::start(config).await;
    test_support::eventually("the consumer with nothing pending removed", Duration::from_secs(10), || async {
        let names: BTreeSet<String> = consumers(&h).await.into_iter().map(|(n, _)| n).collect();
        (names == BTreeSet::from(["c1".to_owned(), "gone-holding".to_owned()])).then_some(())
    })
    .await;
    assert_eq!(running.metric("consumer_departed_consumers_removed_total").await, "1");
    // The one holding an entry keeps it: removing it would leave the entry unclaimable.
    assert!(consumers(&h).await.contains(&("gone-holding".to_owned(), 1)));
    let pending = broker::redis::group::delivery_counts(&mut conn, &h.stream, &h.group, "gone-holding", ("-", "+"), 10)
        .await
        .unwrap();
    assert_eq!(pending.keys().cloned().collect::<Vec<_>>(), held);
    running.stop().await;
}

#[tokio::test]
async fn the_dead_letter_stream_is_capped_and_the_table_keeps_every_letter() {
    let h = Harness::new("dlqcap").await;
    let letters = 300;
    for i in 0..letters {
        h.xadd_fields(&h.stream, &junk(i)).await;
    }
    let mut config = h.config("c1");
    config.dlq_max_len = 10;
    let running = Running::start(config).await;
    h.drained().await;
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, letters as i64);
    let mut conn = h.redis.clone();
    let dlq_len: usize = redis::cmd("XLEN").arg(format!("{}.dlq", h.stream)).query_async(&mut conn).await.unwrap();
    // `MAXLEN ~ 10` drops whole nodes (100 entries each by default), never below 10.
    assert!((10..=110).contains(&dlq_len), "{dlq_len} entries on the dead-letter stream");
    running.stop().await;
}

#[tokio::test]
async fn pending_entries_deleted_from_the_stream_are_counted_when_claimed() {
    let h = Harness::new("gone").await;
    let mut conn = h.redis.clone();
    broker::redis::group::ensure_group(&mut conn, &h.stream, &h.group).await.unwrap();
    for i in 0..3 {
        h.xadd_fields(&h.stream, &junk(i)).await;
    }
    let read = read_as(&h, "died", 3).await;
    let deleted: u64 = redis::cmd("XDEL").arg(&h.stream).arg(&read[..2]).query_async(&mut conn).await.unwrap();
    assert_eq!(deleted, 2);
    let mut config = h.config("c1");
    config.claim_min_idle = Duration::from_secs(1);
    let running = Running::start(config).await;
    h.drained().await;
    assert_eq!(running.metric("consumer_entries_gone_total").await, "2");
    // The one still there was claimed and dead-lettered for what it carries.
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 1);
    running.stop().await;
}

#[tokio::test]
async fn old_dead_letters_go_and_a_gap_that_does_not_fill_shows() {
    let h = Harness::new("dlretention").await;
    for i in 0..3 {
        h.xadd_fields(&h.stream, &junk(i)).await;
    }
    // The order's seq 1 never comes: its seq 2 waits, parked.
    h.xadd(&crate::common::confirmed(domain::OrderId::new(), 2)).await;
    let mut config = h.config("c1");
    config.dead_letter_retention = Duration::from_secs(1);
    let running = Running::start(config).await;
    h.drained().await;
    test_support::eventually("old dead letters removed", Duration::from_secs(10), || async {
        (h.count("SELECT count(*) FROM dead_letters").await == 0).then_some(())
    })
    .await;
    assert_eq!(running.metric("consumer_pruned_dead_letters_total").await, "3");
    test_support::eventually("the parked event sampled", Duration::from_secs(10), || async {
        let age: f64 = running.metric("consumer_parked_oldest_age_seconds").await.parse().ok()?;
        (age >= 1.0).then_some(())
    })
    .await;
    assert_eq!(running.metric("consumer_parked_events").await, "1");
    running.stop().await;
}

#[tokio::test]
async fn dead_letters_can_be_purged_by_hand() {
    let h = Harness::new("dlpurge").await;
    for i in 0..2 {
        h.xadd_fields(&h.stream, &junk(i)).await;
    }
    let running = h.start("c1").await;
    h.drained().await;
    running.stop().await;
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 2);
    let purge = |older_than: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_inventory-consumer"))
            .args(["dead-letters", "purge", "--older-than", older_than])
            .env("DATABASE_URL", &h.db.url)
            .env("REDIS_URL", test_support::redis_url())
            .output()
            .expect("run inventory-consumer")
    };
    let kept = purge("1h");
    assert!(kept.status.success(), "{kept:?}");
    let last_line =
        |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
    assert_eq!(last_line(&kept), "0 dead letters removed");
    let gone = purge("0s");
    assert_eq!(last_line(&gone), "2 dead letters removed");
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn a_replica_whose_redis_runs_no_scripts_for_it_still_consumes() {
    let h = Harness::new("noscripts").await;
    h.set_stock("SKU-1", 100).await;
    for _ in 0..5 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    }
    // Removing departed consumers is one script; the rest of the loop needs none.
    let (config, _user) = h.config_denied("c1", &["-@scripting"]).await;
    let running = Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (100, 5));
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    let refused = test_support::sample(&metrics, "consumer_failures_total", r#"class="permanent",source="redis""#);
    assert!(refused.is_some_and(|n| n > 0.0), "{metrics}");
    running.stop().await;
}
