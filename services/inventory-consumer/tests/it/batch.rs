//! One batch's transaction against writers it races: what it locks is what it reads.

use std::time::Duration;

use domain::OrderId;
use inventory_consumer::apply::{apply_batch, Outcome};
use inventory_consumer::entries::Incoming;
use sqlx::{Connection, PgConnection};

use crate::common::{confirmed, created, Harness};

/// The shipped `DEDUPE_RETENTION`.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

fn incoming(event: domain::Event, stream_id: &str) -> Incoming {
    let fields = event.to_entry().to_fields().into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect();
    Incoming { stream_id: stream_id.to_owned(), event, fields }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_created_by_a_transaction_committing_mid_batch_is_locked_and_read() {
    let h = Harness::new("consumer_checkpoint_race").await;
    let order = OrderId::new();
    // Another transaction creates the order's checkpoint and holds it uncommitted, at seq 1.
    let mut other = PgConnection::connect(&h.db.url).await.unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::query("INSERT INTO aggregate_checkpoints (aggregate_id, last_seq) VALUES ($1, 1)")
        .bind(order.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();

    // The batch's statement starts while that row is uncommitted: it waits for it, then must
    // lock and read the committed row, which its snapshot does not show.
    let incoming = incoming(confirmed(order, 2), "1-0");
    let url = h.db.url.clone();
    let batch = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        apply_batch(&mut conn, &[incoming], &[], RETENTION).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!batch.is_finished(), "the batch waits for the other transaction's checkpoint");
    tx.commit().await.unwrap();

    let result = tokio::time::timeout(Duration::from_secs(10), batch).await.unwrap().unwrap().unwrap();
    assert_eq!(result.outcomes, [Outcome::Applied], "seq 2 follows the committed seq 1; it is not parked");
    assert_eq!(h.checkpoint(order).await, 2);
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 0);
}

#[tokio::test]
async fn a_parked_event_that_creates_an_order_gets_its_stock_locked_when_released() {
    // A producer that numbered an order's creation past 1: it is parked, then released by the
    // event before it, in a later batch that itself names no sku.
    let h = Harness::new("consumer_parked_create").await;
    h.set_stock("SKU-P", 10).await;
    let order = OrderId::new();
    let mut late_create = created(order, &[("SKU-P", 4)]);
    late_create.seq = 2;
    let mut conn = PgConnection::connect(&h.db.url).await.unwrap();
    let parked = apply_batch(&mut conn, &[incoming(late_create, "1-0")], &[], RETENTION).await.unwrap();
    assert_eq!(parked.outcomes, [Outcome::Deferred]);

    let released = apply_batch(&mut conn, &[incoming(confirmed(order, 1), "2-0")], &[], RETENTION).await.unwrap();
    assert_eq!(released.outcomes, [Outcome::Applied]);
    assert_eq!(released.applied.len(), 2, "the parked creation is applied with it");
    assert_eq!(h.reservation(order).await.as_deref(), Some("RESERVED"));
    assert_eq!(h.stock("SKU-P").await, (10, 4));
}
