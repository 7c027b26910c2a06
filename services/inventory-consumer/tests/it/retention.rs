//! DEDUPE_RETENTION: dedupe and ordering state is pruned, and events older than the retention
//! are dead-lettered as expired, so no event can apply twice once its state is gone.

use std::time::Duration;

use chrono::Utc;
use domain::OrderId;

use inventory_consumer::Shutdown;

use crate::common::{cancelled, confirmed, created, Harness, Running};

async fn reasons(h: &Harness) -> Vec<(Option<String>, String)> {
    sqlx::query_as("SELECT event_id, reason FROM dead_letters ORDER BY id").fetch_all(h.pool()).await.unwrap()
}

#[tokio::test]
async fn with_a_short_retention_state_is_pruned_and_old_events_never_apply_again() {
    let h = Harness::new("retention_short").await;
    h.set_stock("SKU-R", 100).await;
    let (kept, closed, open) = (OrderId::new(), OrderId::new(), OrderId::new());
    let kept_created = created(kept, &[("SKU-R", 2)]);
    let closed_created = created(closed, &[("SKU-R", 3)]);
    let closed_cancelled = cancelled(closed, 2);
    for event in
        [&kept_created, &confirmed(kept, 2), &closed_created, &closed_cancelled, &created(open, &[("SKU-R", 1)])]
    {
        h.xadd(event).await;
    }
    let mut config = h.config("c1");
    config.dedupe_retention = Duration::from_secs(2);
    let running = Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-R").await, (98, 1));

    test_support::eventually("dedupe rows and the closed order's state pruned", Duration::from_secs(15), || async {
        let processed = h.count("SELECT count(*) FROM processed_messages").await;
        let checkpoints = h.count("SELECT count(*) FROM aggregate_checkpoints").await;
        (processed == 0 && checkpoints == 2).then_some(())
    })
    .await;
    assert_eq!(h.checkpoint(closed).await, 0, "the cancelled order's checkpoint went");
    assert_eq!(h.reservation(closed).await, None, "with its reservation");
    assert_eq!(h.checkpoint(kept).await, 2, "open orders keep theirs: more events may come");
    assert_eq!(h.checkpoint(open).await, 1);
    assert_eq!(running.metric("consumer_pruned_processed_messages_total").await, "5");
    assert_eq!(running.metric("consumer_pruned_closed_orders_total").await, "1");

    // Every event of the pruned order, delivered again, is too old to apply.
    h.xadd(&closed_created).await;
    h.xadd(&closed_cancelled).await;
    // One of an open order is a duplicate by its checkpoint, dedupe row or not.
    h.xadd(&kept_created).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-R").await, (98, 1), "nothing applied twice");
    assert_eq!(
        h.count("SELECT count(*) FROM aggregate_checkpoints").await,
        2,
        "the expired events left no checkpoint of their order behind"
    );
    let letters = reasons(&h).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (event_id, reason) in &letters {
        assert!(reason.starts_with("expired:"), "{reason}");
        assert!([closed_created.event_id.to_string(), closed_cancelled.event_id.to_string()]
            .contains(&event_id.clone().unwrap()));
    }
    let dlq = h.entries(&format!("{}.dlq", h.stream)).await;
    assert_eq!(dlq.len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn with_the_shipped_retention_an_event_of_eight_days_ago_is_expired_and_six_is_applied() {
    let h = Harness::new("retention_default").await;
    h.set_stock("SKU-D", 10).await;
    let (old, recent) = (OrderId::new(), OrderId::new());
    let mut too_old = created(old, &[("SKU-D", 1)]);
    too_old.occurred_at = Utc::now() - chrono::Duration::days(8);
    let mut late = created(recent, &[("SKU-D", 2)]);
    late.occurred_at = Utc::now() - chrono::Duration::days(6);
    h.xadd(&too_old).await;
    h.xadd(&late).await;
    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-D").await, (10, 2));
    assert_eq!(h.reservation(old).await, None);
    let letters = reasons(&h).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.as_deref(), Some(too_old.event_id.to_string().as_str()));
    assert!(letters[0].1.contains("DEDUPE_RETENTION"), "{}", letters[0].1);
    assert_eq!(running.metric(r#"consumer_events_total{result="dead"}"#).await, "1");
    running.stop().await;
}

#[tokio::test]
async fn control_state_removed_without_the_expiry_rule_lets_an_event_apply_twice() {
    // What the expiry rule prevents: an order's state removed while its events are still
    // recent. The same checks as above see the event applied a second time.
    let h = Harness::new("retention_control").await;
    h.set_stock("SKU-C", 10).await;
    let order = OrderId::new();
    let create = created(order, &[("SKU-C", 4)]);
    h.xadd(&create).await;
    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-C").await, (10, 4));
    for table in ["processed_messages", "aggregate_checkpoints", "order_reservations"] {
        sqlx::query(&format!("DELETE FROM {table}")).execute(h.pool()).await.unwrap();
    }
    h.xadd(&create).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-C").await, (10, 8), "applied twice: the checker sees it");
    assert!(reasons(&h).await.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn counted_entry_failures_last_seen_before_the_retention_go() {
    let h = Harness::new("failures_expiry").await;
    for (entry, ago) in [("1-1", "2 hours"), ("2-1", "30 minutes")] {
        sqlx::query(&format!(
            "INSERT INTO entry_failures (stream_entry_id, failures, last_error, last_failed_at) \
             VALUES ($1, 1, 'refused', now() - interval '{ago}')"
        ))
        .bind(entry)
        .execute(h.pool())
        .await
        .unwrap();
    }
    let pruned =
        inventory_consumer::retention::prune(h.pool(), Duration::from_secs(3600), &Shutdown::new()).await.unwrap();
    assert_eq!(pruned.entry_failures, 1);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT stream_entry_id FROM entry_failures").fetch_all(h.pool()).await.unwrap();
    assert_eq!(left, ["2-1"], "one that failed within the retention stays");
}
