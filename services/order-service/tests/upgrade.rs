//! Upgrading across migration 0011, which moves the numbering of an order's events from the
//! outbox's counter to the order row: orders written before continue their seqs, and a writer
//! from before the migration fails instead of numbering an event twice.

mod common;

use std::borrow::Cow;

use common::{config, count, events, start};
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use ulid::Ulid;

/// The orders migrations before 0011.
fn before_0011() -> Migrator {
    Migrator {
        migrations: Cow::Owned(outbox::MIGRATOR.iter().filter(|m| m.version < 11).cloned().collect()),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

/// How an order-service from before 0011 created an order: the outbox's counter numbered it.
const OLD_CREATE: &str = "\
    WITH created AS ( \
      INSERT INTO orders (id, customer_id, status, items, total_cents, created_at, updated_at) \
      VALUES ($1, 'c-1', 'PENDING', '[]', 0, now(), now())), \
    bumped AS ( \
      INSERT INTO outbox_sequences (aggregate_id, last_seq) VALUES ($1, 1) \
      ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_sequences.last_seq + 1 \
      RETURNING last_seq) \
    INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at) \
    SELECT $2, 'order', $1, bumped.last_seq, 'OrderCreated', '{}', now() FROM bumped";

/// How it confirmed one.
const OLD_CONFIRM: &str = "\
    WITH moved AS (UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE id = $1 RETURNING id), \
    bumped AS ( \
      INSERT INTO outbox_sequences (aggregate_id, last_seq) SELECT $1, 1 FROM moved \
      ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_sequences.last_seq + 1 \
      RETURNING last_seq) \
    INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at) \
    SELECT $2, 'order', $1, bumped.last_seq, 'OrderConfirmed', '{}', now() FROM bumped";

async fn old_write(pool: &PgPool, statement: &str, order_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(statement).bind(order_id).bind(Ulid::new().to_string()).execute(pool).await.map(drop)
}

#[tokio::test]
async fn orders_written_before_the_migration_continue_their_seqs_and_old_writers_fail() {
    let db = test_support::fresh_database("orders_upgrade").await;
    before_0011().run(&db.pool).await.expect("migrations before 0011");
    let (confirmed, pending) = (Ulid::new().to_string(), Ulid::new().to_string());
    for id in [&confirmed, &pending] {
        old_write(&db.pool, OLD_CREATE, id).await.expect("old create");
    }
    old_write(&db.pool, OLD_CONFIRM, &confirmed).await.expect("old confirm");
    // Another aggregate the outbox numbers: its counter stays.
    sqlx::query("INSERT INTO outbox_sequences (aggregate_id, last_seq) VALUES ('account-1', 5)")
        .execute(&db.pool)
        .await
        .expect("a counted aggregate");

    // The service migrates as it starts.
    let app = start(config(&db.url)).await;
    app.wait_ready().await;

    assert_eq!(app.post_empty(&format!("/orders/{confirmed}/cancel")).await.status(), 200);
    assert_eq!(app.post_empty(&format!("/orders/{pending}/confirm")).await.status(), 200);
    let types =
        |events: Vec<(i64, String)>| events.into_iter().map(|(seq, t)| format!("{seq} {t}")).collect::<Vec<_>>();
    assert_eq!(types(events(&db, &confirmed).await), ["1 OrderCreated", "2 OrderConfirmed", "3 OrderCancelled"]);
    assert_eq!(types(events(&db, &pending).await), ["1 OrderCreated", "2 OrderConfirmed"]);
    let counters: Vec<(String, i64)> = sqlx::query_as("SELECT aggregate_id, last_seq FROM outbox_counters")
        .fetch_all(&db.pool)
        .await
        .expect("counters");
    assert_eq!(counters, [("account-1".to_owned(), 5)]);

    // A writer from before the migration is refused, and writes nothing.
    let refused = old_write(&db.pool, OLD_CREATE, &Ulid::new().to_string()).await.expect_err("old create refused");
    let code = refused.as_database_error().and_then(|e| e.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("42P01"), "undefined table: {refused}");
    let refused = old_write(&db.pool, OLD_CONFIRM, &pending).await.expect_err("old confirm refused");
    assert!(refused.as_database_error().is_some(), "{refused}");
    assert_eq!(count(&db, "orders").await, 2);
    assert_eq!(count(&db, "outbox").await, 5);
    app.stop().await;
}
