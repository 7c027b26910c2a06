//! Exactly once and in seq order per order.

use domain::OrderId;

use crate::common::{cancelled, confirmed, created, Harness};

#[tokio::test]
async fn the_same_entry_delivered_five_times_has_one_effect() {
    same_entry_five_times(broker::Kind::Redis).await;
}

/// On NATS the copies are stored as they would be outside JetStream's duplicate window (with
/// no message id): each is delivered, and applied once anyway.
#[tokio::test]
async fn the_same_event_stored_five_times_on_nats_has_one_effect() {
    same_entry_five_times(broker::Kind::Nats).await;
}

async fn same_entry_five_times(broker: broker::Kind) {
    let h = Harness::on("dup5", broker).await;
    h.set_stock("SKU-1", 10).await;
    let order = OrderId::new();
    let event = created(order, &[("SKU-1", 3)]);
    for _ in 0..5 {
        h.xadd(&event).await;
    }
    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 3));
    assert_eq!(h.count("SELECT count(*) FROM processed_messages").await, 1);
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="duplicate"} 4"#), "{metrics}");
    assert!(metrics.contains(r#"consumer_events_total{result="applied"} 1"#), "{metrics}");
    running.stop().await;
}

async fn out_of_order_scenario(batch_size: u32) {
    out_of_order_scenario_on(batch_size, broker::Kind::Redis).await;
}

#[tokio::test]
async fn events_before_their_predecessors_apply_as_if_in_order_on_nats_too() {
    out_of_order_scenario_on(256, broker::Kind::Nats).await;
}

async fn out_of_order_scenario_on(batch_size: u32, broker: broker::Kind) {
    let h = Harness::on("order", broker).await;
    h.set_stock("SKU-1", 10).await;
    h.set_stock("SKU-2", 10).await;
    // Order a: confirm (2) before create (1).
    let a = OrderId::new();
    h.xadd(&confirmed(a, 2)).await;
    h.xadd(&created(a, &[("SKU-1", 3)])).await;
    // Order b: cancel (3), then confirm (2), then create (1): confirmed, then restocked.
    let b = OrderId::new();
    h.xadd(&cancelled(b, 3)).await;
    h.xadd(&confirmed(b, 2)).await;
    h.xadd(&created(b, &[("SKU-2", 4)])).await;
    // Order c: cancel (2) before create (1): the reservation is released.
    let c = OrderId::new();
    h.xadd(&cancelled(c, 2)).await;
    h.xadd(&created(c, &[("SKU-2", 5)])).await;
    let mut config = h.config("c1");
    config.batch_size = batch_size;
    let running = crate::common::Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (7, 0), "a reserved then confirmed");
    assert_eq!(h.stock("SKU-2").await, (10, 0), "b restocked, c released");
    assert_eq!(h.reservation(a).await.as_deref(), Some("CONFIRMED"));
    assert_eq!(h.reservation(b).await.as_deref(), Some("CANCELLED"));
    assert_eq!(h.reservation(c).await.as_deref(), Some("CANCELLED"));
    assert_eq!((h.checkpoint(a).await, h.checkpoint(b).await, h.checkpoint(c).await), (2, 3, 2));
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 0);
    assert_eq!(h.count("SELECT count(*) FROM processed_messages").await, 7);
    running.stop().await;
}

#[tokio::test]
async fn events_before_their_predecessors_apply_as_if_in_order_within_a_batch() {
    out_of_order_scenario(256).await;
}

#[tokio::test]
async fn events_before_their_predecessors_apply_as_if_in_order_across_batches() {
    // One entry per batch: every early event is parked in the table and released later.
    out_of_order_scenario(1).await;
}

#[tokio::test]
async fn a_gap_in_one_order_does_not_hold_up_others() {
    let h = Harness::new("gap").await;
    h.set_stock("SKU-1", 10).await;
    let waiting = OrderId::new();
    let flowing = OrderId::new();
    h.xadd(&confirmed(waiting, 2)).await;
    h.xadd(&created(flowing, &[("SKU-1", 2)])).await;
    h.xadd(&confirmed(flowing, 2)).await;
    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (8, 0));
    assert_eq!(h.checkpoint(waiting).await, 0);
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 1);
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="deferred"} 1"#), "{metrics}");
    // The parked event is applied as soon as its predecessor arrives; a redelivered copy of
    // it is a duplicate.
    let late = created(waiting, &[("SKU-1", 1)]);
    h.xadd(&late).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (7, 0));
    assert_eq!(h.checkpoint(waiting).await, 2);
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 0);
    running.stop().await;
}

#[tokio::test]
async fn the_replay_demo_shows_a_replayed_entry_skipped_as_a_duplicate() {
    let h = Harness::new("replay").await;
    h.set_stock("SKU-1", 10).await;
    let order = OrderId::new();
    let first = h.xadd(&created(order, &[("SKU-1", 3)])).await;
    let running = h.start("c1").await;
    h.drained().await;
    let mut conn = h.redis.clone();
    let config = h.config("demo");
    let timeout = std::time::Duration::from_secs(30);
    let report =
        inventory_consumer::replay_demo::run(h.pool(), &mut conn, &config, Some(&first), timeout).await.unwrap();
    assert_ne!(report.copy_entry_id, first);
    assert_eq!((report.processed_rows, report.checkpoint_before, report.checkpoint_after), (1, 1, 1));
    assert!(report.to_string().contains("duplicate"), "{report}");
    assert_eq!(h.stock("SKU-1").await, (10, 3), "no second effect");
    assert_eq!(h.entries(&h.stream).await.len(), 2, "the copy was added to the stream");
    running.stop().await;
}
