//! Retention, replay and dead-letter handling.

mod common;

use std::time::Duration;

use broker::publish::Publisher;
use chrono::Utc;
use common::*;
use outbox::dead::{list_dead, purge_dead, retry_dead, Retry};
use outbox::failures::{record_failures, Failure};
use outbox::published::trim_published;
use service_kit::Shutdown;

/// Inserts published rows directly, `age` old.
async fn published_rows<'c>(
    pool: impl sqlx::PgExecutor<'c>,
    first_id: i64,
    n: i64,
    aggregate: &str,
    age: chrono::Duration,
) {
    let event_ids: Vec<String> = (0..n).map(|_| ulid::Ulid::new().to_string()).collect();
    sqlx::query(
        "INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
             attempts, created_at, published_at, tenant_id) \
         SELECT $1 + g.n - 1, g.event_id, 'order', $3, g.n, 'OrderConfirmed', jsonb_build_object('order_id', $3::text), \
                now() - $4, 0, now() - $4, now() - $4, 'default' \
         FROM unnest($2::text[]) WITH ORDINALITY AS g(event_id, n)",
    )
    .bind(first_id)
    .bind(&event_ids)
    .bind(aggregate)
    .bind(age)
    .execute(pool)
    .await
    .expect("insert published rows");
}

#[tokio::test]
async fn retention_deletes_only_old_rows_in_bounded_batches() {
    let db = migrated_database("relay_retention").await;
    // A row published late (a retry) sits below the old ones in id order.
    published_rows(&db.pool, 1, 1, "recent", chrono::Duration::hours(2)).await;
    published_rows(&db.pool, 2, 25, "old", chrono::Duration::hours(30)).await;
    published_rows(&db.pool, 1000, 4, "recent", chrono::Duration::hours(2)).await;
    let shutdown = Shutdown::new();
    let day = Duration::from_secs(24 * 3600);
    let report = trim_published(&db.pool, day, 10, Duration::from_millis(1), &shutdown).await.expect("trim");
    assert_eq!(report.deleted, 25);
    assert_eq!(report.statements, 3, "10 + 10 + 5 rows, one bounded statement each");
    let left: Vec<String> = sqlx::query_scalar("SELECT DISTINCT aggregate_id FROM outbox_published")
        .fetch_all(&db.pool)
        .await
        .expect("left");
    assert_eq!(left, ["recent"]);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 5);

    // Only one relay trims at a time.
    let mut holder = db.pool.acquire().await.expect("conn");
    sqlx::query("SELECT pg_advisory_lock($1)").bind(0x6f75_7462_6f79_i64).execute(&mut *holder).await.expect("lock");
    let report = trim_published(&db.pool, Duration::ZERO, 10, Duration::from_millis(1), &shutdown).await.expect("trim");
    assert!(report.skipped);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 5);
}

#[tokio::test]
async fn replay_republishes_retained_events_in_id_order() {
    let db = migrated_database("relay_replay").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-replay");
    published_rows(&db.pool, 1, 3, "too-old", chrono::Duration::hours(5)).await;
    published_rows(&db.pool, 100, 4, "a", chrono::Duration::minutes(10)).await;
    published_rows(&db.pool, 200, 3, "b", chrono::Duration::minutes(5)).await;
    let mut publisher = Publisher::new(&redis, stream.clone()).expect("publisher");

    let since = Utc::now() - chrono::Duration::hours(1);
    // Batch of 2: several pages, each one pipeline.
    let n = relay::replay::replay(&db.pool, &mut publisher, since, relay::replay::Only::All, 2).await.expect("replay");
    assert_eq!(n, 7);
    let entries = read_stream(&redis, &stream).await;
    let got: Vec<(String, i64)> = entries.iter().map(|e| (e.aggregate_id.clone(), e.seq)).collect();
    let want: Vec<(String, i64)> = [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("b", 2), ("b", 3)]
        .iter()
        .map(|(a, s)| (a.to_string(), *s))
        .collect();
    assert_eq!(got, want);

    delete_stream(&redis, &stream).await;
    let n = relay::replay::replay(&db.pool, &mut publisher, since, relay::replay::Only::Aggregate("b"), 1000)
        .await
        .expect("replay one");
    assert_eq!(n, 3);
    assert!(read_stream(&redis, &stream).await.iter().all(|e| e.aggregate_id == "b"));
    delete_stream(&redis, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_out_of_attempts_go_dead_and_can_be_retried() {
    let db = migrated_database("relay_dead").await;
    let redis = test_support::redis_url();
    let stream = test_support::unique_name("relay-dead");
    let first = append(&db.pool, "o-1", &order_payload("o-1")).await;
    let second = append(&db.pool, "o-2", &order_payload("o-2")).await;

    // Redis refused both rows on their one allowed attempt (as `record_failures` records a
    // refusal; a Redis that is down costs no attempt at all).
    let rows: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempts FROM outbox ORDER BY id").fetch_all(&db.pool).await.expect("rows");
    let refused: Vec<Failure> = rows
        .iter()
        .map(|(id, attempts)| Failure {
            id: *id,
            attempts: *attempts,
            retry_in: Duration::from_secs(60),
            error: "redis: ERR refused".to_owned(),
        })
        .collect();
    let outcomes = record_failures(&db.pool, &refused, 1).await.expect("record");
    assert!(outcomes.iter().all(|o| o.status == "dead"), "{outcomes:?}");
    let dead = list_dead(&db.pool).await.expect("list");
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].event_id, first.event_id.to_string());
    assert_eq!((dead[0].seq, dead[0].attempts), (1, 1));
    assert!(dead.iter().all(|d| d.last_error.as_deref() == Some("redis: ERR refused")), "{dead:?}");

    assert_eq!(retry_dead(&db.pool, Retry::One("not-an-event")).await.expect("retry"), 0);
    assert_eq!(retry_dead(&db.pool, Retry::One(&second.event_id.to_string())).await.expect("retry"), 1);
    let state: (String, i32) = sqlx::query_as("SELECT status, attempts FROM outbox WHERE event_id = $1")
        .bind(second.event_id.to_string())
        .fetch_one(&db.pool)
        .await
        .expect("row");
    assert_eq!(state, ("pending".to_owned(), 0));

    let relay = RunningRelay::start(config(&db.url, &redis, &stream)).await;
    wait_until_published(&db.pool, 1, Duration::from_secs(20)).await;
    assert_eq!(retry_dead(&db.pool, Retry::All).await.expect("retry all"), 1);
    wait_until_published(&db.pool, 2, Duration::from_secs(20)).await;
    relay.stop().await;
    let ids: Vec<_> = read_stream(&redis, &stream).await.into_iter().map(|e| e.event_id).collect();
    assert_eq!(ids, [second.event_id, first.event_id]);
    assert!(list_dead(&db.pool).await.expect("list").is_empty());
    delete_stream(&redis, &stream).await;
}

/// Inserts `n` pending rows, two per order, straight into the outbox.
#[tokio::test]
async fn purging_dead_events_takes_the_later_events_of_their_orders_and_nothing_younger() {
    let db = migrated_database("relay_purge").await;
    // Order a: seq 1 ok (still pending), seq 2 dead for long, seq 3 waiting behind it.
    // Order b: seq 1 dead, but recently. Order c: nothing dead.
    for aggregate in ["a", "a", "a", "b", "c"] {
        append(&db.pool, aggregate, &order_payload(aggregate)).await;
    }
    sqlx::query(
        "UPDATE outbox SET status = 'dead', created_at = now() - interval '40 days' WHERE aggregate_id = 'a' AND seq = 2",
    )
    .execute(&db.pool)
    .await
    .expect("kill a/2");
    sqlx::query("UPDATE outbox SET status = 'dead' WHERE aggregate_id = 'b'")
        .execute(&db.pool)
        .await
        .expect("kill b/1");

    let purged = purge_dead(&db.pool, Duration::from_secs(30 * 86_400)).await.expect("purge");
    let mut removed: Vec<(String, i64, String)> =
        purged.into_iter().map(|p| (p.aggregate_id, p.seq, p.status)).collect();
    removed.sort();
    assert_eq!(removed, [("a".to_owned(), 2, "dead".to_owned()), ("a".to_owned(), 3, "pending".to_owned())]);
    let left: Vec<(String, i64)> = sqlx::query_as("SELECT aggregate_id, seq FROM outbox ORDER BY aggregate_id, seq")
        .fetch_all(&db.pool)
        .await
        .expect("left");
    let left: Vec<(&str, i64)> = left.iter().map(|(a, s)| (a.as_str(), *s)).collect();
    assert_eq!(left, [("a", 1), ("b", 1), ("c", 1)]);
    assert!(purge_dead(&db.pool, Duration::from_secs(30 * 86_400)).await.expect("purge").is_empty());
}

async fn pending_rows<'c>(pool: impl sqlx::PgExecutor<'c>, n: i64) {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at) \
         SELECT 'ev-' || g, 'order', 'order-' || (g / 2), 1 + g % 2, 'OrderCreated', '{}', now() \
         FROM generate_series(0, $1 - 1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .expect("insert pending rows");
}

#[tokio::test]
async fn claims_walk_the_primary_key_even_with_stale_statistics() {
    let db = migrated_database("relay_claim_plan").await;
    // Statistics taken while the outbox was empty, never refreshed: the planner believes the
    // table is tiny, and would scan and sort all of it on every claim.
    sqlx::query("ANALYZE outbox").execute(&db.pool).await.expect("analyze");
    pending_rows(&db.pool, 20_000).await;
    let pool = claim_pool(&db.url, Duration::from_secs(30)).await;
    let mut tx = pool.begin_with(outbox::claim::BEGIN_CLAIM).await.expect("begin");
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", outbox::claim::CLAIM_SQL))
        .bind(1000_i64)
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    tx.rollback().await.expect("rollback");
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan using outbox_pkey on outbox o"), "{plan}");
    assert!(!plan.contains("Seq Scan on outbox"), "{plan}");
}

#[tokio::test]
async fn upkeep_vacuums_and_analyzes_tables_past_their_thresholds() {
    use service_kit::upkeep::{upkeep_once, Action, LOCK_NAMESPACE};
    let db = migrated_database("relay_upkeep").await;
    let tables = relay::UPKEEP_TABLES;
    assert!(upkeep_once(&db.pool, tables).await.expect("upkeep").is_empty(), "fresh tables need nothing");

    // 3 000 dead rows in the outbox; 600 new rows in outbox_published. A backend reports its
    // counters at most once a second unless told to: the writer is told to after its writes.
    let mut writer = db.pool.acquire().await.expect("connection");
    pending_rows(&mut *writer, 3_000).await;
    sqlx::query("DELETE FROM outbox").execute(&mut *writer).await.expect("delete");
    published_rows(&mut *writer, 1, 600, "order-x", chrono::Duration::hours(1)).await;
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *writer).await.expect("flush");
    drop(writer);

    // Another process is vacuuming the outbox: this round leaves it alone.
    let mut holder = db.pool.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1, hashtext('outbox'))")
        .bind(LOCK_NAMESPACE)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let done = upkeep_once(&db.pool, tables).await.expect("upkeep");
    assert!(done.contains(&("outbox".to_owned(), Action::Skipped)), "{done:?}");
    assert!(done.contains(&("outbox_published".to_owned(), Action::Analyzed)), "{done:?}");
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext('outbox'))")
        .bind(LOCK_NAMESPACE)
        .execute(&mut *holder)
        .await
        .expect("unlock");
    drop(holder);

    let done = upkeep_once(&db.pool, tables).await.expect("upkeep");
    assert_eq!(done, vec![("outbox".to_owned(), Action::Vacuumed)]);
    let (vacuumed, analyzed): (bool, bool) = sqlx::query_as(
        "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'outbox'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("stats");
    assert!(vacuumed && analyzed);
    // Done is done: the counters were reset, so the next round has nothing to do.
    assert!(upkeep_once(&db.pool, tables).await.expect("upkeep").is_empty());
}
