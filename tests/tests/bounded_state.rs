//! Bounded state with the whole system running, checked by the ledger checker.
//!
//! - Retentions of a second or a few: a few thousand orders leave the stream,
//!   `processed_messages`, `idempotency_keys` and the state of cancelled orders empty, the
//!   inventory exactly as the model says, and old events added to the stream again change
//!   nothing. Control: the same events with a fresh `occurred_at` (nothing left can tell them
//!   from new ones) are applied again, and the checker reports exactly those orders.
//! - Redis (no persistence) restarted empty in the middle of the load, with consumers behind:
//!   the system drains to the exact model with no command run by hand.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outbox::row::{OutboxRow, EVENT_COLUMNS};
use redis::AsyncCommands;
use system_tests::faults::cluster::{Cluster, ClusterSpec};
use system_tests::faults::drain::backlog;
use system_tests::faults::load::{drive, Gate, LoadOutcome, LoadSpec};
use system_tests::faults::model::Step;
use system_tests::faults::plan::{self, PlannedOrder};
use system_tests::faults::run::{self, start_cluster, Report};
use tokio::sync::Mutex;

/// Each test runs a whole cluster; one at a time keeps them fast on small machines.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const ORDERS: usize = 3_000;

/// Spread over this long, the load stays well within what the debug build keeps up with, so
/// every event is applied long before `DEDUPE_RETENTION` below would expire it.
const LOAD_TIME: Duration = Duration::from_secs(30);

fn load_spec(seed: u64) -> LoadSpec {
    LoadSpec { seed, concurrency: 16, step_deadline: Duration::from_secs(30), spread_over: Some(LOAD_TIME) }
}

async fn settle(cluster: &mut Cluster, plan: &[PlannedOrder], load: LoadOutcome, seed: u64) -> Report {
    run::settle(cluster, plan, load, seed, Duration::from_secs(120)).await.expect("check")
}

async fn wait_drained(cluster: &Cluster) {
    let left = cluster.drain(Duration::from_secs(60)).await.expect("drain");
    assert!(left.is_empty(), "not drained: {left:?}");
}

/// What the retentions bound.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    stream_entries: u64,
    processed_messages: i64,
    idempotency_keys: i64,
    /// Checkpoints of cancelled orders (no event can follow), and all reservations.
    closed_checkpoints: i64,
    reservations: i64,
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> Option<i64> {
    sqlx::query_scalar(sql).fetch_one(pool).await.ok()
}

impl Sizes {
    async fn read(cluster: &Cluster) -> Option<Self> {
        let mut conn = cluster.redis_client().ok()?.get_multiplexed_async_connection().await.ok()?;
        let (orders, inventory) = (&cluster.orders_db, &cluster.inventory_db);
        Some(Self {
            stream_entries: conn.xlen(&cluster.stream).await.ok()?,
            processed_messages: count(inventory, "SELECT count(*) FROM processed_messages").await?,
            idempotency_keys: count(orders, "SELECT count(*) FROM idempotency_keys").await?,
            closed_checkpoints: count(inventory, "SELECT count(*) FROM aggregate_checkpoints WHERE closed").await?,
            reservations: count(inventory, "SELECT count(*) FROM order_reservations").await?,
        })
    }

    /// Everything the retentions remove is gone (reservations of orders still open stay: they
    /// can still be confirmed or cancelled).
    fn emptied(&self) -> bool {
        (self.stream_entries, self.processed_messages, self.idempotency_keys, self.closed_checkpoints) == (0, 0, 0, 0)
    }
}

async fn stock(cluster: &Cluster) -> Vec<(String, i64, i64)> {
    sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory ORDER BY sku")
        .fetch_all(&cluster.inventory_db)
        .await
        .expect("stock")
}

/// Ids of up to `n` orders that reserved stock and were then cancelled (acknowledged).
fn cancelled_orders(plan: &[PlannedOrder], load: &LoadOutcome, n: usize) -> Vec<String> {
    plan.iter()
        .zip(&load.ledger)
        .filter(|(order, entry)| !order.doomed() && entry.acked.last() == Some(&Step::Cancel))
        .filter_map(|(_, entry)| entry.order_id.clone())
        .take(n)
        .collect()
}

/// Adds the first event (`OrderCreated`) of each order to the stream once more, as retained in
/// `outbox_published`, with its own `occurred_at` or (`fresh`) the time now.
async fn add_first_events_again(cluster: &Cluster, orders: &[String], fresh: bool) {
    let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM outbox_published WHERE aggregate_id = ANY($1) AND seq = 1"
    ))
    .bind(orders)
    .fetch_all(&cluster.orders_db)
    .await
    .expect("retained events");
    assert_eq!(rows.len(), orders.len(), "every order's first event is retained");
    let mut conn = cluster.redis_client().expect("redis").get_multiplexed_async_connection().await.expect("redis");
    for row in rows {
        let mut entry = row.to_entry(usize::MAX).expect("a published event encodes");
        if fresh {
            entry.occurred_at = Utc::now();
        }
        let _: String = conn.xadd(&cluster.stream, "*", &entry.to_fields()).await.expect("XADD");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_long_retentions_leave_the_stream_and_tables_empty_and_the_inventory_exact() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 31;
    let spec = ClusterSpec {
        stream_retention: Some(Duration::from_secs(1)),
        idempotency_key_ttl: Some(Duration::from_secs(1)),
        dedupe_retention: Some(Duration::from_secs(5)),
        ..ClusterSpec::default()
    };
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(spec, &plan).await.expect("cluster");
    let load = drive(cluster.http.clone(), cluster.api(), plan.clone(), load_spec(seed), Gate::new(usize::MAX)).await;
    let ledger = load.ledger.clone();
    let report = settle(&mut cluster, &plan, load, seed).await;
    // Nothing expired on the way (no dead letter), nothing lost or applied twice.
    assert!(report.holds(), "{report}");
    let published = report.findings.events_published;
    assert!(published > ORDERS, "{report}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let sizes = loop {
        let sizes = Sizes::read(&cluster).await;
        if let Some(sizes) = sizes.filter(Sizes::emptied) {
            break sizes;
        }
        assert!(tokio::time::Instant::now() < deadline, "the retentions left {sizes:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("after the retentions: {sizes:?}");
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status <> 'CANCELLED'")
        .fetch_one(&cluster.orders_db)
        .await
        .expect("open orders");
    assert!(sizes.reservations <= open, "only open orders keep a reservation: {sizes:?}, {open} open");
    let cancelled_ids: Vec<String> = sqlx::query_scalar("SELECT id FROM orders WHERE status = 'CANCELLED'")
        .fetch_all(&cluster.orders_db)
        .await
        .expect("cancelled orders");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM order_reservations WHERE order_id = ANY($1)")
        .bind(&cancelled_ids)
        .fetch_one(&cluster.inventory_db)
        .await
        .expect("reservations of cancelled orders");
    assert!(!cancelled_ids.is_empty(), "the plan cancels orders");
    assert_eq!(kept, 0, "no cancelled order keeps its reservation");

    // Old events added again: every retained event published once more, and the first event of
    // some cancelled orders on its own. Their dedupe rows are gone; their age turns them away.
    let before = stock(&cluster).await;
    let cancelled = cancelled_orders(&plan, &LoadOutcome { ledger: ledger.clone(), ..LoadOutcome::default() }, 20);
    assert_eq!(cancelled.len(), 20, "the plan cancels orders");
    cluster.relay_replay("15m").await.expect("relay replay");
    add_first_events_again(&cluster, &cancelled, false).await;
    wait_drained(&cluster).await;
    assert_eq!(stock(&cluster).await, before, "old events changed the stock");
    let (dead, expired): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE reason LIKE 'expired%') FROM dead_letters")
            .fetch_one(&cluster.inventory_db)
            .await
            .expect("dead letters");
    assert!(expired >= cancelled.len() as i64, "{expired} expired dead letters");
    assert_eq!(dead, expired, "every dead letter is an expired event");

    // Control: the same first events, each with a fresh occurred_at. Nothing is left that can
    // tell them from new events, so each reserves again, and the checker must say so for
    // exactly those orders: their own SKU stands where the first event alone, or the events in
    // the wrong order, would leave it, and the consumers count one application too many each.
    add_first_events_again(&cluster, &cancelled, true).await;
    wait_drained(&cluster).await;
    let report = settle(&mut cluster, &plan, LoadOutcome { ledger, ..LoadOutcome::default() }, seed).await;
    let f = &report.findings;
    let flagged = f.reordered + f.orders_missing_effects + f.orders_wrong_effects + f.double_applied;
    assert_eq!((flagged, f.reapplied), (cancelled.len(), cancelled.len() as u64), "{report}");
    assert!(!report.holds());
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_load_drains_to_the_exact_model_with_nothing_run_by_hand() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 32;
    let spec = ClusterSpec { redis_persistent: false, ..ClusterSpec::default() };
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(spec, &plan).await.expect("cluster");
    let gate = Gate::new(ORDERS / 3);
    let load = tokio::spawn(drive(cluster.http.clone(), cluster.api(), plan.clone(), load_spec(seed), gate.clone()));

    // A third of the load consumed as it comes; the consumers then fall behind for another third.
    gate.reached(ORDERS / 3, Duration::from_secs(120)).await;
    for c in &cluster.consumers {
        c.signal("STOP").expect("freeze consumer");
    }
    gate.open_to(2 * ORDERS / 3);
    gate.reached(2 * ORDERS / 3, Duration::from_secs(120)).await;
    let conn = cluster.redis_client().expect("redis").get_multiplexed_async_connection().await.expect("redis");
    // The relays have published every event written so far (the load waits at the gate).
    let behind = test_support::eventually("the outbox published up to the gate", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let cluster = &cluster;
        async move {
            let b = backlog(&cluster.orders_db, &cluster.inventory_db, &mut conn, &cluster.streams, &cluster.group)
                .await
                .ok()?;
            (b.outbox_pending == 0).then_some(b)
        }
    })
    .await;
    // The restart loses what the consumers had not read yet.
    assert!(behind.stream_undelivered > 0, "the consumers are behind: {behind:?}");
    eprintln!("Redis restarted empty with the consumers behind: {behind:?}");
    cluster.redis.kill();
    tokio::task::block_in_place(|| cluster.redis.restart());
    for c in &cluster.consumers {
        c.signal("CONT").expect("thaw consumer");
    }
    gate.open_to(usize::MAX);
    let load = load.await.expect("load");
    assert!(load.anomalies.is_empty(), "{:?}", load.anomalies);

    // The drain cannot tell an emptied stream from a consumed one: wait for the relays to have
    // republished (they count a republishing when it is complete).
    let lost = behind.stream_undelivered as f64;
    test_support::eventually("the relays republished what Redis lost", Duration::from_secs(60), || async {
        (cluster.relays_counter("outbox_stream_recovered_events_total").await >= lost).then_some(())
    })
    .await;
    // Noticed once: by the relay that found the marker gone (the others' entries went with
    // the stream it replaced).
    assert_eq!(cluster.relays_counter("outbox_stream_recoveries_total").await, 1.0, "one relay recovered");

    let report = settle(&mut cluster, &plan, load, seed).await;
    assert!(report.findings.events_published > ORDERS, "{report}");
    assert!(report.holds(), "{report}");
    cluster.discard_logs();
}
