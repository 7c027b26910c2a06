//! Entries that cannot be applied go to the dead-letter stream and table; others flow.

use std::time::Duration;

use domain::OrderId;
use redis::Value;

use crate::common::{confirmed, created, Harness};

fn without(fields: Vec<(&'static str, String)>, name: &str) -> Vec<(String, Vec<u8>)> {
    fields.into_iter().filter(|(k, _)| *k != name).map(|(k, v)| (k.to_owned(), v.into_bytes())).collect()
}

fn replacing(fields: Vec<(&'static str, String)>, name: &str, value: &str) -> Vec<(String, Vec<u8>)> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), if k == name { value.to_owned() } else { v }.into_bytes())).collect()
}

#[tokio::test]
async fn poison_entries_are_dead_lettered_and_other_orders_still_apply() {
    poison_entries(broker::Kind::Redis).await;
}

#[tokio::test]
async fn poison_entries_are_dead_lettered_and_other_orders_still_apply_on_nats() {
    poison_entries(broker::Kind::Nats).await;
}

async fn poison_entries(broker: broker::Kind) {
    let h = Harness::on("poison", broker).await;
    h.set_stock("SKU-1", 10).await;
    let good = OrderId::new();
    let bad = OrderId::new();
    let missing_seq = h
        .xadd_fields(&h.stream, &without(created(OrderId::new(), &[("SKU-1", 1)]).to_entry().to_fields(), "seq"))
        .await;
    h.xadd(&created(good, &[("SKU-1", 2)])).await;
    let bad_json = h
        .xadd_fields(
            &h.stream,
            &replacing(created(bad, &[("SKU-1", 1)]).to_entry().to_fields(), "payload", "{\"order_id\": "),
        )
        .await;
    let unknown_type = h
        .xadd_fields(
            &h.stream,
            &replacing(confirmed(OrderId::new(), 1).to_entry().to_fields(), "event_type", "OrderShipped"),
        )
        .await;
    // The order whose create was dead-lettered waits: its confirm is parked.
    h.xadd(&confirmed(bad, 2)).await;
    h.xadd(&confirmed(good, 2)).await;

    let running = h.start("c1").await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (8, 0), "the good order was applied");
    assert_eq!(h.checkpoint(bad).await, 0);
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 1);

    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT stream_entry_id, reason, aggregate_id FROM dead_letters ORDER BY id")
            .fetch_all(h.pool())
            .await
            .unwrap();
    let reasons: Vec<(&str, &str)> = rows.iter().map(|(id, r, _)| (id.as_str(), r.as_str())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|(id, r)| *id == missing_seq && r.contains("`seq`")), "{reasons:?}");
    assert!(reasons.iter().any(|(id, r)| *id == bad_json && r.contains("`payload`")), "{reasons:?}");
    assert!(reasons.iter().any(|(id, r)| *id == unknown_type && r.contains("OrderShipped")), "{reasons:?}");
    assert!(rows.iter().any(|(_, _, agg)| agg.as_deref() == Some(bad.to_string().as_str())));

    let dlq = h.entries(&format!("{}.dlq", h.stream)).await;
    assert_eq!(dlq.len(), 3);
    for (_, fields) in &dlq {
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let original = get("original_entry_id").expect("original entry id");
        assert!([&missing_seq, &bad_json, &unknown_type].contains(&&original));
        assert!(!get("reason").expect("reason").is_empty());
        assert!(get("event_id").is_some(), "original fields kept");
    }
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="dead"} 3"#), "{metrics}");
    running.stop().await;
}

/// Makes `pending` deliveries of entry `id` to a consumer named `ghost` that never finishes
/// them: read once, then claimed again and again, as by replicas that keep dying.
async fn deliver_to_a_dying_replica(h: &Harness, id: &str, deliveries: usize) {
    let mut conn = h.redis.clone();
    let _: Value =
        redis::cmd("XGROUP").arg("CREATE").arg(&h.stream).arg(&h.group).arg("0").query_async(&mut conn).await.unwrap();
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&h.group)
        .arg("ghost")
        .arg("STREAMS")
        .arg(&h.stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 1..deliveries {
        let _: Value = redis::cmd("XCLAIM")
            .arg(&h.stream)
            .arg(&h.group)
            .arg("ghost")
            .arg(0)
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_valid_entry_delivered_many_times_is_applied_not_dead_lettered() {
    let h = Harness::new("maxdel").await;
    h.set_stock("SKU-1", 10).await;
    let order = OrderId::new();
    let id = h.xadd(&created(order, &[("SKU-1", 4)])).await;
    // Six deliveries that never finished (restarts, claims), with MAX_DELIVERIES 2: none of them
    // was a failure of the entry's own.
    deliver_to_a_dying_replica(&h, &id, 6).await;
    let mut config = h.config("c1");
    config.claim_min_idle = Duration::from_secs(1);
    config.max_deliveries = 2;
    let running = crate::common::Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 4), "applied once");
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 0);
    assert!(h.entries(&format!("{}.dlq", h.stream)).await.is_empty());
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("consumer_redelivered_total 1"), "{metrics}");
    running.stop().await;
}

/// Makes the database refuse (a rule the entry breaks) a `timing` (`INSERT`, `UPDATE`) of
/// `table` rows whose `column` is `value`.
async fn refuse(h: &Harness, timing: &str, table: &str, column: &str, value: &str) {
    sqlx::query(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.{column} = '{value}' THEN RAISE EXCEPTION 'refused by a rule'; END IF; RETURN NEW; END $$"
    ))
    .execute(h.pool())
    .await
    .unwrap();
    sqlx::query(&format!("CREATE TRIGGER refuse BEFORE {timing} ON {table} FOR EACH ROW EXECUTE FUNCTION refuse()"))
        .execute(h.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_entry_the_database_refuses_is_dead_lettered_after_max_deliveries_failures_and_can_be_redriven() {
    let h = Harness::new("refused").await;
    h.set_stock("SKU-1", 10).await;
    let refused_order = OrderId::new();
    let refused = created(refused_order, &[("SKU-1", 4)]);
    refuse(&h, "INSERT", "processed_messages", "event_id", &refused.event_id.to_string()).await;
    let id = h.xadd(&refused).await;
    let fine = OrderId::new();
    h.xadd(&created(fine, &[("SKU-1", 1)])).await;
    let mut config = h.config("c1");
    config.claim_min_idle = Duration::from_secs(1);
    config.max_deliveries = 3;
    let running = crate::common::Running::start(config).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 1), "the other order applied, the refused one not");
    let (dl_id, reason): (i64, String) =
        sqlx::query_as("SELECT id, reason FROM dead_letters WHERE stream_entry_id = $1")
            .bind(&id)
            .fetch_one(h.pool())
            .await
            .unwrap();
    assert!(
        reason.starts_with("failed 3 times (MAX_DELIVERIES is 3)") && reason.contains("refused by a rule"),
        "{reason}"
    );
    assert_eq!(h.count("SELECT count(*) FROM entry_failures").await, 0, "dead-lettered entries are forgotten");
    assert_eq!(h.entries(&format!("{}.dlq", h.stream)).await.len(), 1);
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_failures_total{class="permanent",source="entry"} 3"#), "{metrics}");

    // Re-driven once the rule is fixed, the same fields flow through again and apply.
    sqlx::query("DROP TRIGGER refuse ON processed_messages").execute(h.pool()).await.unwrap();
    let mut conn = h.redis.clone();
    let listed = inventory_consumer::dead_letters::list(h.pool(), false).await.unwrap();
    assert_eq!(listed.iter().map(|d| d.id).collect::<Vec<_>>(), vec![dl_id]);
    let redriven = inventory_consumer::dead_letters::redrive(
        h.pool(),
        &mut conn,
        &domain::Partitions::single(&h.stream),
        Some(dl_id),
    )
    .await
    .unwrap();
    assert_eq!(redriven.len(), 1);
    h.drained().await;
    assert_eq!(h.stock("SKU-1").await, (10, 5));
    assert!(inventory_consumer::dead_letters::list(h.pool(), false).await.unwrap().is_empty());
    // A second re-drive of the same dead letter is refused.
    assert!(inventory_consumer::dead_letters::redrive(
        h.pool(),
        &mut conn,
        &domain::Partitions::single(&h.stream),
        Some(dl_id)
    )
    .await
    .is_err());
    running.stop().await;
}

#[tokio::test]
async fn a_refused_entry_whose_event_was_applied_already_is_a_duplicate_not_a_dead_letter() {
    let h = Harness::new("refdup").await;
    h.set_stock("SKU-1", 10).await;
    let order = OrderId::new();
    let create = created(order, &[("SKU-1", 2)]);
    h.xadd(&create).await;
    let first = h.start("c1").await;
    h.drained().await;
    first.stop().await;
    assert_eq!(h.stock("SKU-1").await, (10, 2));
    // The same event again (a relay republished it), and now the database refuses anything
    // touching its order's checkpoint: the copy can only fail.
    refuse(&h, "UPDATE", "aggregate_checkpoints", "aggregate_id", &order.to_string()).await;
    h.xadd(&create).await;
    let mut config = h.config("c2");
    config.claim_min_idle = Duration::from_secs(1);
    config.max_deliveries = 2;
    let running = crate::common::Running::start(config).await;
    h.drained().await;
    assert_eq!(h.count("SELECT count(*) FROM dead_letters").await, 0, "a duplicate is never dead-lettered");
    assert_eq!(h.stock("SKU-1").await, (10, 2));
    let metrics = reqwest::get(running.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"consumer_events_total{result="duplicate"} 1"#), "{metrics}");
    running.stop().await;
}
