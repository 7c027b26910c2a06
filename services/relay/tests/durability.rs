//! `REDIS_MIN_REPLICAS`: a batch counts as published only once replicas hold it.

mod common;

use std::time::Duration;

use common::*;

/// With one replica required, rows are published while the replica is up; with it down, Redis
/// still takes the entries but the relay records none of them as published and counts no
/// attempt (they go out again once it is back: a duplicate at worst, nothing a failover could
/// lose). Control: with no replica required, the same outage does not hold anything back, so
/// the hold is the `WAIT`'s doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_counts_as_published_only_once_the_required_replicas_hold_it() {
    let db = migrated_database("relay_min_replicas").await;
    let primary = test_support::PrivateRedis::start(false);
    let mut replica = test_support::PrivateRedis::start_replica_of(&primary);
    let stream = test_support::unique_name("relay-replicas");
    let mut cfg = config(&db.url, &primary.url(), &stream);
    cfg.redis_min_replicas = 1;
    cfg.redis_wait_timeout = Duration::from_millis(300);
    cfg.max_attempts = 1;
    cfg.poll_interval = Duration::from_millis(100);
    let relay = RunningRelay::start(cfg).await;

    append_spread(&db.pool, 10, 5).await;
    wait_until_published(&db.pool, 10, Duration::from_secs(20)).await;

    replica.kill();
    append_spread(&db.pool, 10, 5).await;
    test_support::eventually("Redis took the unconfirmed entries", Duration::from_secs(20), || async {
        (stream_len(&primary.url(), &stream).await > 10).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 10, "nothing unconfirmed recorded");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 0").await, 10);

    replica.restart();
    wait_until_published(&db.pool, 20, Duration::from_secs(30)).await;
    relay.stop().await;
    let ids = distinct_event_ids(&primary.url(), &stream).await;
    assert_eq!(ids.len(), 20, "every event on the stream, republished ones once each by id");

    // Control: no replica required, the replica down: published all the same.
    let control_stream = test_support::unique_name("relay-replicas-control");
    let control_db = migrated_database("relay_min_replicas_control").await;
    let mut cfg = config(&control_db.url, &primary.url(), &control_stream);
    cfg.poll_interval = Duration::from_millis(100);
    replica.kill();
    let relay = RunningRelay::start(cfg).await;
    append_spread(&control_db.pool, 5, 5).await;
    wait_until_published(&control_db.pool, 5, Duration::from_secs(20)).await;
    relay.stop().await;
}

/// On a Redis Cluster (3 primaries, each with a replica) with 6 partitions, each batch is
/// split by partition, every entry lands on its partition's stream on the primary serving it,
/// and each shard's `WAIT` is answered by that primary's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_each_partition_s_entries_go_to_its_shard_confirmed_by_its_replica() {
    use broker::redis::target::{RedisTarget, Timeouts};
    let cluster =
        tokio::task::spawn_blocking(|| test_support::PrivateRedisCluster::start(3, 1, Duration::from_millis(1500)))
            .await
            .expect("cluster");
    let target = RedisTarget::new("redis://unused", &cluster.urls()).expect("seeds");
    let partitions = domain::Partitions::new(test_support::unique_name("relay-cluster"), 6).expect("partitions");
    let mut publisher =
        broker::publish::Publisher::to(target.clone(), partitions.clone()).with_min_replicas(1, Duration::from_secs(2));
    let entries: Vec<domain::StreamEntry> = (0..60).map(|i| confirmed_entry(&format!("order-{i}"))).collect();
    let ids = publisher.publish(&entries).await.expect("published, confirmed by a replica on every shard");
    assert_eq!(ids.len(), entries.len());
    let mut conn =
        target.connect(Timeouts::new(Duration::from_secs(2), Duration::from_secs(5))).await.expect("connect");
    for (i, stream) in partitions.streams().iter().enumerate() {
        let len: usize = redis::cmd("XLEN").arg(stream).query_async(&mut conn).await.expect("XLEN");
        let expected = entries.iter().filter(|e| partitions.of(&e.aggregate_id) == i).count();
        assert_eq!(len, expected, "{stream}");
        // The shard that serves the partition's slot holds it (the slot computed here is Redis's).
        let slot = domain::partition::key_slot(stream);
        let node = cluster.primary_of(slot).expect("a primary for the slot");
        assert_eq!(cluster.nodes[node].cli(&["CLUSTER", "KEYSLOT", stream]), slot.to_string());
        assert_eq!(cluster.nodes[node].cli(&["XLEN", stream]), expected.to_string());
    }
}
