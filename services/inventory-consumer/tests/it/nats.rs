//! What is NATS JetStream's own in the consumer (`BROKER=nats`): a message a replica took and
//! never finished goes to another after `AckWait` (the claim after idle), however often that
//! happened, without counting against `MAX_DELIVERIES`; a batch worked on longer than `AckWait`
//! is not handed to another replica meanwhile; an event JetStream stored twice (outside its
//! duplicate window) is applied once.

use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{self, group, Layout};
use domain::{OrderId, Partitions};
use sqlx::Connection;

use crate::common::{created, Harness, Running};

const NATS: broker::Kind = broker::Kind::Nats;

async fn js() -> (async_nats::Client, async_nats::jetstream::Context) {
    let client = async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
    (client.clone(), jetstream::context(client))
}

#[tokio::test]
async fn a_message_a_dying_replica_never_finished_goes_to_another_and_is_applied_not_dead_lettered() {
    let h = Harness::on("nats_maxdel", NATS).await;
    h.set_stock("SKU-1", 10).await;
    h.xadd(&created(OrderId::new(), &[("SKU-1", 4)])).await;
    let mut config = h.config("c1");
    config.claim_min_idle = Duration::from_secs(1);
    config.max_deliveries = 2;
    // Six deliveries to a member that never acknowledges (replicas that keep dying), each
    // handed out again after AckWait.
    let (_, js) = js().await;
    let layout = Layout::new(&Partitions::single(&h.stream));
    let settings = group::GroupSettings {
        group: h.group.clone(),
        ack_wait: config.claim_min_idle,
        batch: 10,
        max_ack_pending: 1000,
    };
    let ghost = group::ensure_consumer(&js, &layout, 0, &settings).await.expect("the group");
    for delivery in 1..=6 {
        let pulled = group::pull(&ghost, 10, Duration::from_secs(3)).await.expect("pull");
        assert_eq!(pulled.iter().map(|p| p.delivered).collect::<Vec<_>>(), [delivery], "delivered again");
    }
    let running = Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 4), "applied once");
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 0);
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("consumer_redelivered_total 1"), "{metrics}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_held_up_longer_than_ack_wait_is_not_handed_to_another_replica() {
    let h = Harness::on("nats_slow", NATS).await;
    h.set_stock("SKU-1", 100).await;
    // A session holds the stock row, so the batch that reserves it waits 4 s, twice AckWait.
    let mut blocker = sqlx::PgConnection::connect(&h.db.url).await.expect("connect");
    let mut tx = blocker.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM inventory WHERE sku = 'SKU-1' FOR UPDATE").execute(&mut *tx).await.expect("lock");
    for _ in 0..3 {
        h.xadd(&created(OrderId::new(), &[("SKU-1", 1)])).await;
    }
    let replica = |name: &str| {
        let mut config = h.config(name);
        config.claim_min_idle = Duration::from_secs(2);
        config.db_lock_timeout = Some(Duration::from_secs(1));
        Running::start(config)
    };
    let (a, b) = (replica("a").await, replica("b").await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    tx.rollback().await.expect("release the row");
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (100, 3));
    for running in [&a, &b] {
        let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("consumer_redelivered_total 0"), "no message was delivered twice\n{metrics}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_event_published_again_after_the_duplicate_window_is_stored_twice_and_applied_once() {
    let h = Harness::on("nats_window", NATS).await;
    h.set_stock("SKU-1", 10).await;
    let layout = Layout::new(&Partitions::single(&h.stream));
    let (client, js) = js().await;
    // The harness made the stream; a window of 1 s stands in for the 2 minutes.
    let mut config = js.get_stream(&layout.stream).await.expect("stream").cached_info().config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config).await.expect("a short duplicate window");
    let publisher = jetstream::publish::Publisher::new(client, layout.clone());
    let entry = created(OrderId::new(), &[("SKU-1", 2)]).to_entry();

    let first = publisher.publish(std::slice::from_ref(&entry)).await;
    let inside = publisher.publish(std::slice::from_ref(&entry)).await;
    assert!(inside[0].as_ref().is_ok_and(|p| p.duplicate), "inside the window: stored once ({inside:?})");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outside = publisher.publish(std::slice::from_ref(&entry)).await;
    assert!(outside[0].as_ref().is_ok_and(|p| !p.duplicate), "outside it: stored again ({outside:?})");
    assert_ne!(first[0].as_ref().map(|p| p.sequence).ok(), outside[0].as_ref().map(|p| p.sequence).ok());
    assert_eq!(h.entries(&h.stream).await.len(), 2, "the stream holds the event twice");

    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 2), "applied once");
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="duplicate"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"consumer_events_total{result="applied"} 1"#), "{metrics}");
    running.stop().await;
}

#[tokio::test]
async fn a_dead_letter_stream_jetstream_lost_is_made_again_and_the_letter_added() {
    let h = Harness::on("nats_dlq_lost", NATS).await;
    let running = h.start("c1").await;
    let layout = Layout::new(&Partitions::single(&h.stream));
    let (_, js) = js().await;
    test_support::eventually("the dead letters' stream made", Duration::from_secs(10), || async {
        js.get_stream(&layout.dlq_stream).await.ok().map(|_| ())
    })
    .await;
    js.delete_stream(&layout.dlq_stream).await.expect("the dead letters' stream deleted");
    h.xadd_fields(&h.stream, &[("event_id".to_owned(), b"not-a-ulid".to_vec())]).await;
    h.drained().await;
    assert_eq!(h.entries(&layout.dlq_subject).await.len(), 1, "the letter is on the stream made again");
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 1, "and recorded once");
    running.stop().await;
}
