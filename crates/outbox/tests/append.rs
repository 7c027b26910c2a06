//! `append` against a real Postgres: contiguous seqs under concurrency, atomicity with the
//! caller's transaction, and the stored trace context.

use chrono::Utc;
use outbox::{append, NewEvent, MIGRATOR};
use sqlx::PgPool;

async fn orders_db() -> PgPool {
    let db = test_support::fresh_database("outbox").await;
    MIGRATOR.run(&db.pool).await.expect("migrate");
    db.pool
}

fn event(aggregate_id: &str) -> NewEvent<'_> {
    NewEvent {
        aggregate_type: "order",
        aggregate_id,
        event_type: "OrderConfirmed",
        payload: r#"{"order_id":"x"}"#,
        occurred_at: Utc::now(),
        notify: false,
    }
}

async fn append_committed(pool: &PgPool, aggregate_id: &str) -> i64 {
    let mut tx = pool.begin().await.expect("begin");
    let appended = append(&mut tx, event(aggregate_id)).await.expect("append");
    tx.commit().await.expect("commit");
    appended.seq
}

#[tokio::test]
async fn concurrent_writers_to_one_aggregate_get_contiguous_seqs_in_id_order() {
    let pool = orders_db().await;
    let writers = (0..40).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { append_committed(&pool, "agg-1").await })
    });
    let mut seqs: Vec<i64> = futures_join(writers).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());

    // The relay relies on ids growing with seq within an aggregate.
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT id, seq FROM outbox WHERE aggregate_id = 'agg-1' ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("rows");
    let by_id: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(by_id, (1..=40).collect::<Vec<_>>());
}

async fn futures_join(handles: impl Iterator<Item = tokio::task::JoinHandle<i64>>) -> Vec<i64> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("writer task"));
    }
    out
}

#[tokio::test]
async fn a_rolled_back_append_leaves_no_event_and_no_gap() {
    let pool = orders_db().await;
    assert_eq!(append_committed(&pool, "agg-2").await, 1);
    let mut tx = pool.begin().await.expect("begin");
    assert_eq!(append(&mut tx, event("agg-2")).await.expect("append").seq, 2);
    tx.rollback().await.expect("rollback");
    assert_eq!(append_committed(&pool, "agg-2").await, 2);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_id = 'agg-2'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 2);
}

#[tokio::test]
async fn aggregates_have_independent_sequences_and_unique_event_ids() {
    let pool = orders_db().await;
    for agg in ["a", "b", "a", "c", "b", "a"] {
        append_committed(&pool, agg).await;
    }
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT aggregate_id, max(seq) FROM outbox GROUP BY 1 ORDER BY 1")
        .fetch_all(&pool)
        .await
        .expect("rows");
    assert_eq!(rows, vec![("a".into(), 3), ("b".into(), 2), ("c".into(), 1)]);
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM outbox").fetch_one(&pool).await.expect("count");
    assert_eq!(distinct, 6);
}

#[tokio::test]
async fn duplicate_seq_is_rejected_by_the_named_constraint() {
    let pool = orders_db().await;
    append_committed(&pool, "agg-3").await;
    let err = sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at) \
         VALUES ('01HZZZZZZZZZZZZZZZZZZZZZZZ', 'order', 'agg-3', 1, 'OrderConfirmed', '{}', now())",
    )
    .execute(&pool)
    .await
    .expect_err("a second seq 1 must be refused");
    let constraint = err.as_database_error().and_then(|e| e.constraint()).map(str::to_owned);
    assert_eq!(constraint.as_deref(), Some("outbox_aggregate_seq_unique"));
}

#[tokio::test]
async fn without_a_trace_no_context_is_stored() {
    let pool = orders_db().await;
    append_committed(&pool, "agg-4").await;
    let (tp, ts): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT traceparent, tracestate FROM outbox").fetch_one(&pool).await.expect("row");
    assert_eq!((tp, ts), (None, None));
}
