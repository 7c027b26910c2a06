//! Controls for the ledger checker: broken set-ups it must catch, and the repair it must
//! accept.
//!
//! - Redis without persistence (a cache) crashes with published, unconsumed entries and
//!   nothing replays them: the checker must report every one of those events lost.
//! - The same crash followed by `relay replay --since`: the ledger must hold.
//! - Inventory's dedupe record wiped and the stream consumed again by a new group: the
//!   checker must report exactly the orders whose stock moved twice (on Redis, and on NATS
//!   with a new group of durable consumers reading the JetStream stream from its start).
//! - The dedupe record wiped with the reservations kept, and every event published again: the
//!   stock shows nothing (the reservations absorb the copies), and the checker must still
//!   report every event applied a second time.
//! - A relay that numbers each order's events backwards: the checker must report exactly the
//!   orders with more than one event as applied out of seq order, and nothing else (on Redis,
//!   and on NATS).

use std::sync::Arc;
use std::time::Duration;

use broker::Kind;
use system_tests::faults::cluster::{Cluster, ClusterSpec};
use system_tests::faults::drain::backlog;
use system_tests::faults::inject::Injected;
use system_tests::faults::load::{drive, Gate, LoadOutcome, LoadSpec};
use system_tests::faults::misnumbering::publish_numbering_backwards;
use system_tests::faults::plan::{self, PlannedOrder};
use system_tests::faults::run::{self, settle_and_check, start_cluster, Report};
use tokio::sync::Mutex;

/// The controls each run a whole cluster; one at a time keeps them fast on small machines.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const ORDERS: usize = 300;

async fn load(cluster: &Cluster, plan: &Arc<Vec<PlannedOrder>>, seed: u64) -> LoadOutcome {
    let spec = LoadSpec { seed, concurrency: 16, step_deadline: Duration::from_secs(30), spread_over: None };
    drive(cluster.http.clone(), cluster.api(), plan.clone(), spec, Gate::new(usize::MAX)).await
}

async fn settle(cluster: &mut Cluster, plan: &[PlannedOrder], load: LoadOutcome, seed: u64) -> Report {
    run::settle(cluster, plan, load, seed, Duration::from_secs(60)).await.expect("check")
}

/// Consumers frozen, the load published in full to a Redis without persistence, Redis
/// crashed and restarted empty, consumers thawed and back in their (recreated) group.
/// `retained`: whether the published events are still retained for republishing (the
/// relays' own recovery, or `relay replay`); without, nothing can bring them back.
async fn cache_redis_forgets(seed: u64, retained: bool) -> (Cluster, Arc<Vec<PlannedOrder>>, LoadOutcome) {
    let spec = ClusterSpec { redis_persistent: false, ..ClusterSpec::default() };
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(spec, &plan).await.expect("cluster");
    for c in &cluster.consumers {
        c.signal("STOP").expect("freeze consumer");
    }
    let outcome = load(&cluster, &plan, seed).await;
    assert!(outcome.anomalies.is_empty(), "{:?}", outcome.anomalies);
    test_support::eventually("outbox published in full", Duration::from_secs(60), || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&cluster.orders_db).await.ok()?;
        (pending == 0).then_some(())
    })
    .await;
    if !retained {
        // Published longer ago than OUTBOX_RETENTION as far as republishing can tell (the
        // checker still counts them as published).
        sqlx::query("UPDATE outbox_published SET published_at = now() - interval '2 days'")
            .execute(&cluster.orders_db)
            .await
            .expect("age the retained events");
    }
    cluster.redis.kill();
    tokio::task::block_in_place(|| cluster.redis.restart());
    for c in &cluster.consumers {
        c.signal("CONT").expect("thaw consumer");
    }
    let client = cluster.redis_client().expect("redis client");
    test_support::eventually("consumer group recreated", Duration::from_secs(60), || async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        backlog(&cluster.orders_db, &cluster.inventory_db, &mut conn, &cluster.streams, &cluster.group).await.ok()
    })
    .await;
    (cluster, plan, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_loss_when_a_cache_redis_forgets_and_nothing_is_retained_to_replay() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 11;
    let (mut cluster, plan, outcome) = cache_redis_forgets(seed, false).await;
    let report = settle(&mut cluster, &plan, outcome, seed).await;
    let f = &report.findings;
    assert!(f.events_published > ORDERS, "the load published its events");
    // Only what the frozen consumers' blocked reads had already been handed before the crash
    // (at most one read each) can have been applied; every other event is gone.
    assert!(f.events_processed <= 3 * 256, "{report}");
    assert_eq!(
        f.unapplied_events,
        f.events_published - f.events_processed,
        "every unapplied event is reported lost\n{report}"
    );
    assert!(f.unapplied_events > f.events_published / 2, "{report}");
    assert!(f.lost() >= f.unapplied_events && !report.holds());
    assert_eq!(f.double_applied, 0);
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_replay_restores_what_a_cache_redis_forgot() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 12;
    let (mut cluster, plan, outcome) = cache_redis_forgets(seed, true).await;
    cluster.relay_replay("15m").await.expect("relay replay");
    let report = settle(&mut cluster, &plan, outcome, seed).await;
    assert!(report.findings.events_published > ORDERS);
    assert!(report.holds(), "{report}");
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_restore_by_themselves_what_a_cache_redis_forgot() {
    // The same loss, nothing run by hand: the relays notice their marker gone and republish.
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 13;
    let (mut cluster, plan, outcome) = cache_redis_forgets(seed, true).await;
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_published").fetch_one(&cluster.orders_db).await.expect("count");
    // The drain check cannot tell an emptied stream from a consumed one: wait for the relays.
    test_support::eventually("the relays republished what Redis lost", Duration::from_secs(30), || async {
        (cluster.relays_counter("outbox_stream_recovered_events_total").await >= published as f64).then_some(())
    })
    .await;
    assert_eq!(cluster.relays_counter("outbox_stream_recoveries_total").await, 1.0, "one relay recovered");
    let report = settle(&mut cluster, &plan, outcome, seed).await;
    assert!(report.findings.events_published > ORDERS);
    assert!(report.holds(), "{report}");
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_double_apply_when_the_dedupe_record_is_lost() {
    double_apply_when_the_dedupe_record_is_lost(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_double_apply_when_the_dedupe_record_is_lost_on_nats() {
    double_apply_when_the_dedupe_record_is_lost(Kind::Nats).await;
}

async fn double_apply_when_the_dedupe_record_is_lost(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 13;
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(ClusterSpec { broker, ..ClusterSpec::default() }, &plan).await.expect("cluster");
    let outcome = load(&cluster, &plan, seed).await;
    let ledger = outcome.ledger.clone();
    let first = settle(&mut cluster, &plan, outcome, seed).await;
    assert!(first.holds(), "before the damage the ledger holds\n{first}");

    // Forget what was applied, then let a new group read the whole stream again.
    for c in &mut cluster.consumers {
        c.kill().await;
    }
    sqlx::query("TRUNCATE processed_messages, aggregate_checkpoints, order_reservations, parked_events")
        .execute(&cluster.inventory_db)
        .await
        .expect("wipe the dedupe record");
    let again = "inventory-again";
    // On NATS the consumers create the new group's durable consumer themselves, delivering
    // the stream from its start.
    if broker == Kind::Redis {
        let mut conn = cluster.redis_client().expect("redis").get_multiplexed_async_connection().await.expect("redis");
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&cluster.stream)
            .arg(again)
            .arg("0")
            .query_async::<()>(&mut conn)
            .await
            .expect("new group");
    }
    cluster.group = again.to_owned();
    for c in &mut cluster.consumers {
        c.set_env("CONSUMER_GROUP", again);
        c.start().expect("restart consumer");
    }
    let replayed = LoadOutcome { ledger, ..LoadOutcome::default() };
    let report = settle(&mut cluster, &plan, replayed, seed).await;

    // Applied twice, an order's own SKU moves twice unless its last event undoes its first.
    let twice = plan
        .iter()
        .zip(&first_ledger_statuses(&cluster, &plan).await)
        .filter(|(o, status)| !o.doomed() && matches!(status.as_deref(), Some("PENDING" | "CONFIRMED")))
        .count();
    assert!(twice > ORDERS / 4, "the plan has pending and confirmed orders");
    assert_eq!(report.findings.double_applied, twice, "{report}");
    assert!(!report.holds());
    cluster.discard_logs();
}

async fn first_ledger_statuses(cluster: &Cluster, plan: &[PlannedOrder]) -> Vec<Option<String>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT customer_id, status FROM orders").fetch_all(&cluster.orders_db).await.expect("orders");
    let by_customer: std::collections::HashMap<String, String> = rows.into_iter().collect();
    plan.iter().map(|o| by_customer.get(&o.customer_id()).cloned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_events_applied_out_of_seq_order_apart_from_other_faults() {
    events_applied_out_of_seq_order(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_events_applied_out_of_seq_order_apart_from_other_faults_on_nats() {
    events_applied_out_of_seq_order(Kind::Nats).await;
}

async fn events_applied_out_of_seq_order(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 14;
    let plan = Arc::new(plan::generate(seed, ORDERS));
    // No relay runs: the test publishes, as a relay that numbers each order's events backwards.
    let spec = ClusterSpec { relays: 0, broker, ..ClusterSpec::default() };
    let mut cluster = start_cluster(spec, &plan).await.expect("cluster");
    let outcome = load(&cluster, &plan, seed).await;
    assert!(outcome.anomalies.is_empty(), "{:?}", outcome.anomalies);
    let reversed = publish_numbering_backwards(&cluster).await.expect("broken relay");
    assert!(reversed > ORDERS / 2, "most orders have more than one event ({reversed})");
    let report = settle(&mut cluster, &plan, outcome, seed).await;
    let f = &report.findings;
    assert_eq!(f.reordered, reversed, "every order with more than one event\n{report}");
    // Counted apart: not as lost, double-applied or wrong.
    assert_eq!((f.lost(), f.double_applied, f.orders_wrong_effects), (0, 0, 0), "{report}");
    assert!(!report.holds());
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_events_applied_again_when_only_the_reservations_hide_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 15;
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(ClusterSpec::default(), &plan).await.expect("cluster");
    // One sampler for both passes: the consumers' own count of what they applied.
    let sampler = cluster.sampler().expect("sampler");
    let outcome = load(&cluster, &plan, seed).await;
    let left = cluster.drain(Duration::from_secs(60)).await.expect("drain");
    assert!(left.is_empty(), "{left:?}");

    // The dedupe record (and with it the ordering state) is lost; the reservations stay. Every
    // event is then published again: only processed_messages and the checkpoints could have
    // told the copies apart.
    sqlx::query("TRUNCATE processed_messages, aggregate_checkpoints, parked_events")
        .execute(&cluster.inventory_db)
        .await
        .expect("wipe the dedupe record");
    cluster.relay_replay("15m").await.expect("relay replay");
    let report =
        settle_and_check(&mut cluster, &plan, outcome, Injected::default(), sampler, seed, Duration::from_secs(60))
            .await
            .expect("check");
    eprintln!("{report}");
    let f = &report.findings;
    // The reservations absorbed the copies, so the stock shows nothing …
    assert_eq!((f.double_applied, f.inventory_mismatches, f.orders_wrong_effects), (0, 0, 0), "{report}");
    // … and the checker still sees every event applied a second time.
    assert_eq!(f.reapplied, f.events_published as u64, "{report}");
    assert!(!report.holds());
    cluster.discard_logs();
}
