//! Controls for the ledger checker: broken set-ups it must catch, and the repair it must
//! accept.
//!
//! - Redis without persistence (a cache) crashes with published, unconsumed entries and
//!   nothing replays them: the checker must report every one of those events lost.
//! - The same crash followed by `relay replay --since`: the ledger must hold.
//! - Inventory's dedupe record wiped and the stream consumed again by a new group: the
//!   checker must report exactly the orders whose stock moved twice.

use std::sync::Arc;
use std::time::Duration;

use system_tests::faults::cluster::{Cluster, ClusterSpec};
use system_tests::faults::drain::{backlog, RedeliverySampler};
use system_tests::faults::inject::Injected;
use system_tests::faults::load::{drive, Gate, LoadOutcome, LoadSpec};
use system_tests::faults::plan::{self, PlannedOrder};
use system_tests::faults::process::binary;
use system_tests::faults::run::{settle_and_check, start_cluster, Report};
use tokio::sync::Mutex;

/// The controls each run a whole cluster; one at a time keeps them fast on small machines.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const ORDERS: usize = 300;

async fn load(cluster: &Cluster, plan: &Arc<Vec<PlannedOrder>>, seed: u64) -> LoadOutcome {
    let spec = LoadSpec { seed, concurrency: 16, step_deadline: Duration::from_secs(30), spread_over: None };
    drive(cluster.http.clone(), cluster.api(), plan.clone(), spec, Gate::new(usize::MAX)).await
}

async fn settle(cluster: &mut Cluster, plan: &[PlannedOrder], load: LoadOutcome, seed: u64) -> Report {
    let sampler = RedeliverySampler::start(
        cluster.redis_client().expect("redis client"),
        cluster.stream.clone(),
        cluster.group.clone(),
        cluster.consumer_ports(),
    );
    let report = settle_and_check(cluster, plan, load, Injected::default(), sampler, seed, Duration::from_secs(60))
        .await
        .expect("check");
    eprintln!("{report}");
    report
}

/// Consumers frozen, the load published in full to a Redis without persistence, Redis
/// crashed and restarted empty, consumers thawed and back in their (recreated) group.
async fn cache_redis_forgets(seed: u64) -> (Cluster, Arc<Vec<PlannedOrder>>, LoadOutcome) {
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
    cluster.redis.kill();
    tokio::task::block_in_place(|| cluster.redis.restart());
    for c in &cluster.consumers {
        c.signal("CONT").expect("thaw consumer");
    }
    let client = cluster.redis_client().expect("redis client");
    test_support::eventually("consumer group recreated", Duration::from_secs(60), || async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        backlog(&cluster.orders_db, &cluster.inventory_db, &mut conn, &cluster.stream, &cluster.group).await.ok()
    })
    .await;
    (cluster, plan, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_loss_when_a_cache_redis_forgets_and_nothing_replays() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 11;
    let (mut cluster, plan, outcome) = cache_redis_forgets(seed).await;
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
    let (mut cluster, plan, outcome) = cache_redis_forgets(seed).await;
    let status = tokio::process::Command::new(binary("relay").expect("relay binary"))
        .args(["replay", "--since", "15m"])
        .env("DATABASE_URL", &cluster.orders_url)
        .env("REDIS_URL", cluster.redis.url())
        .env("REDIS_STREAM", &cluster.stream)
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("run relay replay");
    assert!(status.success(), "relay replay failed: {status}");
    let report = settle(&mut cluster, &plan, outcome, seed).await;
    assert!(report.findings.events_published > ORDERS);
    assert!(report.holds(), "{report}");
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_reports_double_apply_when_the_dedupe_record_is_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = 13;
    let plan = Arc::new(plan::generate(seed, ORDERS));
    let mut cluster = start_cluster(ClusterSpec::default(), &plan).await.expect("cluster");
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
    let mut conn = cluster.redis_client().expect("redis").get_multiplexed_async_connection().await.expect("redis");
    let again = "inventory-again";
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&cluster.stream)
        .arg(again)
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .expect("new group");
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
