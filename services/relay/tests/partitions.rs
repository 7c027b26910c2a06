//! `STREAM_PARTITIONS`: each order's events on one partition stream, in seq order, and a relay
//! whose number of partitions is not the one recorded refuses to relay.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_order_s_events_go_to_its_partition_in_seq_order() {
    let db = migrated_database("relay_partitions").await;
    let stream = test_support::unique_name("relay-partitions");
    let mut cfg = config(&db.url, &test_support::redis_url(), &stream);
    cfg.topology.stream_partitions = 4;
    cfg.poll_interval = Duration::from_millis(100);
    let partitions = cfg.topology.partitions(&stream);
    let (first, second) = (RunningRelay::start(cfg.clone()).await, RunningRelay::start(cfg).await);
    append_spread(&db.pool, 200, 40).await;
    wait_until_published(&db.pool, 200, Duration::from_secs(30)).await;
    first.stop().await;
    second.stop().await;
    let mut seen = 0;
    for (i, partition) in partitions.streams().iter().enumerate() {
        let entries = read_stream(&test_support::redis_url(), partition).await;
        assert!(!entries.is_empty(), "40 orders over 4 partitions leave none empty ({partition})");
        for e in &entries {
            assert_eq!(partitions.of(&e.aggregate_id), i, "{} on {partition}", e.aggregate_id);
        }
        // Per order, seq 1, 2, … in stream order (each event once: nothing failed here).
        let mut next = std::collections::HashMap::<&str, i64>::new();
        for e in &entries {
            let expected = next.entry(e.aggregate_id.as_str()).or_insert(1);
            assert_eq!(e.seq, *expected, "order {} out of order on {partition}", e.aggregate_id);
            *expected += 1;
        }
        seen += entries.len();
        delete_stream(&test_support::redis_url(), partition).await;
    }
    assert_eq!(seen, 200);
    assert_eq!(stream_len(&test_support::redis_url(), &stream).await, 0, "nothing on the unpartitioned name");
    let mut conn = test_support::redis_connection().await;
    let recorded: String = redis::cmd("GET")
        .arg(broker::redis::target::partitions_key(&stream))
        .query_async(&mut conn)
        .await
        .expect("the number of partitions recorded");
    assert_eq!(recorded, "4");
}

/// A relay started with another STREAM_PARTITIONS than the one recorded relays nothing and
/// says why on /readyz; control: one with the recorded number is ready and relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_with_another_number_of_partitions_refuses_to_relay() {
    let db = migrated_database("relay_partitions_refused").await;
    let stream = test_support::unique_name("relay-partitions-refused");
    let mut cfg = config(&db.url, &test_support::redis_url(), &stream);
    cfg.topology.stream_partitions = 3;
    cfg.poll_interval = Duration::from_millis(100);
    let recorded = RunningRelay::start(cfg.clone()).await;
    test_support::eventually("the first relay ready", Duration::from_secs(20), || async {
        let resp = reqwest::get(format!("http://{}/readyz", recorded.addr)).await.ok()?;
        resp.status().is_success().then_some(())
    })
    .await;
    recorded.stop().await;

    let mut other = cfg.clone();
    other.topology.stream_partitions = 2;
    let refused = RunningRelay::start(other).await;
    let why = test_support::eventually("the relay says why it is not ready", Duration::from_secs(20), || async {
        let resp = reqwest::get(format!("http://{}/readyz", refused.addr)).await.ok()?;
        let body = resp.text().await.ok()?;
        body.contains("STREAM_PARTITIONS is 2").then_some(body)
    })
    .await;
    assert!(why.contains("spread over 3 partitions"), "{why}");
    append_spread(&db.pool, 3, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 0, "nothing relayed");
    refused.stop().await;

    let control = RunningRelay::start(cfg).await;
    wait_until_published(&db.pool, 3, Duration::from_secs(20)).await;
    control.stop().await;
    let mut conn = test_support::redis_connection().await;
    let key = broker::redis::target::partitions_key(&stream);
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.expect("DEL");
}

/// One partition's stream key holding another type refuses every entry of that partition
/// alike: Redis is to blame (the batch goes back, no row counts an attempt), not those rows,
/// though the other partitions took theirs. Control: with the key right, the same batch is
/// published.
#[tokio::test]
async fn a_partition_whose_stream_refuses_every_entry_blames_redis_not_its_rows() {
    let stream = test_support::unique_name("relay-partition-wrongtype");
    let partitions = domain::Partitions::new(&stream, 3).expect("partitions");
    let target = broker::redis::target::RedisTarget::new(&test_support::redis_url(), &[]).expect("url");
    let mut publisher = broker::publish::Publisher::to(target, partitions.clone());
    let entries: Vec<domain::StreamEntry> = (0..30).map(|i| confirmed_entry(&format!("order-{i}"))).collect();
    let mut conn = test_support::redis_connection().await;
    let _: () = redis::cmd("SET").arg(partitions.stream(1)).arg("not a stream").query_async(&mut conn).await.unwrap();
    let refused = publisher.publish(&entries).await;
    assert!(
        matches!(
            &refused,
            Err(broker::publish::PublishError::Broker { class: service_kit::FailureClass::permanent, .. })
        ),
        "{refused:?}"
    );
    let _: () = redis::cmd("DEL").arg(partitions.stream(1)).query_async(&mut conn).await.unwrap();
    let ids = publisher.publish(&entries).await.expect("published once the key is a stream");
    assert_eq!(ids.len(), entries.len());
    for partition in partitions.streams() {
        delete_stream(&test_support::redis_url(), partition).await;
    }
}
