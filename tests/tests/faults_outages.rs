//! Long outages and stuck replicas, with the shipped defaults: no cliff. Each runs on Redis and
//! on NATS (JetStream on file storage), where the broker's crash is `kill -9` of nats-server.
//!
//! - The broker down for 2 minutes under load, every setting at its default: no outbox row goes
//!   dead or even counts an attempt; when the broker returns, everything is applied once.
//! - A consumer frozen (SIGSTOP) in the middle of a batch transaction and never resumed: the
//!   other replicas drain everything within CLAIM_MIN_IDLE plus the session timeouts.
//! - Consumers killed and restarted many times, and frozen mid-batch past `CLAIM_MIN_IDLE` (so
//!   the entries they held are surely delivered again), plus a 20 s broker outage, with tight
//!   limits (`MAX_DELIVERIES=1`, so any redelivery is past it, `OUTBOX_MAX_ATTEMPTS=3`,
//!   `OUTBOX_BACKOFF_BASE=100ms`): nothing is dead-lettered.
//! - The broker's server crashed 16 times under load: nothing lost, nothing applied twice, and
//!   the group drains (no consumer is left waiting on a pull the crash cut off).
//!
//! `FAULT_SEED=<n>` replays a run's plan and schedule.

use std::sync::Arc;
use std::time::Duration;

use broker::Kind;
use system_tests::faults::cluster::{Cluster, ClusterSpec};
use system_tests::faults::inject::Injected;
use system_tests::faults::load::{drive, Gate, LoadSpec};
use system_tests::faults::plan;
use system_tests::faults::run::{settle_and_check, start_cluster, Report};
use system_tests::faults::{run, seed_from_env, RunSpec};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Each test runs a whole cluster; one at a time keeps them fast on small machines.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn get(cluster: &Cluster, port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    match cluster.http.get(url).timeout(Duration::from_secs(2)).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Rows that ever counted an attempt, in the outbox and among those published.
async fn rows_with_attempts(cluster: &Cluster) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox WHERE attempts > 0) \
              + (SELECT count(*) FROM outbox_published WHERE attempts > 0)",
    )
    .fetch_one(&cluster.orders_db)
    .await
    .expect("attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_minute_redis_outage_with_the_shipped_defaults_kills_no_row_and_loses_nothing() {
    two_minute_outage_with_the_shipped_defaults(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_minute_nats_outage_with_the_shipped_defaults_kills_no_row_and_loses_nothing() {
    two_minute_outage_with_the_shipped_defaults(Kind::Nats).await;
}

async fn two_minute_outage_with_the_shipped_defaults(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = seed_from_env();
    let outage = Duration::from_secs(120);
    let plan = Arc::new(plan::generate(seed, 2_000));
    let mut cluster = start_cluster(ClusterSpec { broker, ..ClusterSpec::shipped() }, &plan).await.expect("cluster");
    let sampler = cluster.sampler().expect("sampler");
    // The load runs before, through and after the outage: the API needs only Postgres.
    let spec = LoadSpec {
        seed,
        concurrency: 16,
        step_deadline: Duration::from_secs(60),
        spread_over: Some(outage + Duration::from_secs(30)),
    };
    let load = tokio::spawn(drive(cluster.http.clone(), cluster.api(), plan.clone(), spec, Gate::new(usize::MAX)));
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.kill_broker();
    let down_at = Instant::now();
    // Well into the outage (past the 1 s, 3 s, 9 s, 27 s, 81 s of the shipped backoff), the
    // relays say the broker is down, count no attempt, and are alive.
    tokio::time::sleep(Duration::from_secs(95)).await;
    for relay in &cluster.relays {
        let (status, body) = get(&cluster, relay.http_port, "/readyz").await;
        assert_eq!(status, 503, "{}: {body}", relay.name);
        assert!(body.contains(&format!("{broker}: not taking entries for")), "{}: {body}", relay.name);
        let (_, metrics) = get(&cluster, relay.http_port, "/metrics").await;
        assert!(metrics.contains("outbox_broker_up 0\n"), "{}: {metrics}", relay.name);
        assert_eq!(get(&cluster, relay.http_port, "/healthz").await.0, 200, "{}", relay.name);
    }
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&cluster.orders_db).await.expect("outbox rows");
    assert!(pending > 500, "the outage held back a real backlog ({pending} rows)");
    eprintln!("{pending} rows waiting in the outbox {:?} into the outage", down_at.elapsed());
    assert_eq!(rows_with_attempts(&cluster).await, 0, "an outage costs no attempt");
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    cluster.restart_broker();
    let load = load.await.expect("load");
    let mut injected = Injected::default();
    let outage_kind = match broker {
        Kind::Redis => "redis down for 2 minutes",
        Kind::Nats => "nats-server down for 2 minutes",
    };
    injected.by_kind.insert(outage_kind, 1);
    let report = settle_and_check(&mut cluster, &plan, load, injected, sampler, seed, Duration::from_secs(120))
        .await
        .expect("check");
    eprintln!("{report}");
    assert!(report.holds(), "{report}");
    assert_eq!(report.findings.outbox_dead, 0);
    assert_eq!(rows_with_attempts(&cluster).await, 0, "no row counted an attempt");
    assert!(report.drain_time < Duration::from_secs(60), "drained {:?} after the load", report.drain_time);
    cluster.discard_logs();
}

/// Everything drained within this after the freeze: claims of the frozen replica's entries
/// after CLAIM_MIN_IDLE (30 s), its transaction ended by the idle-in-transaction timeout
/// (10 s, within the claim wait), lock waits (5 s), and a margin for the machine.
const FROZEN_DRAIN_BOUND: Duration = Duration::from_secs(30 + 10 + 5 + 20);

/// Batches the unfrozen consumers retried after a transient Postgres failure (lock timeouts).
async fn lock_waits_given_up(cluster: &Cluster) -> f64 {
    let others = cluster.consumers[1..].iter().map(|c| c.http_port);
    cluster.metric_sum(others, "consumer_failures_total", r#"{class="transient",source="postgres"}"#).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_frozen_mid_transaction_and_never_resumed_blocks_no_other_replica() {
    frozen_for_good_blocks_no_other_replica(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_frozen_mid_transaction_and_never_resumed_blocks_no_other_replica_on_nats() {
    frozen_for_good_blocks_no_other_replica(Kind::Nats).await;
}

async fn frozen_for_good_blocks_no_other_replica(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = seed_from_env();
    let plan = Arc::new(plan::generate(seed, 4_000));
    let mut cluster = start_cluster(ClusterSpec { broker, ..ClusterSpec::shipped() }, &plan).await.expect("cluster");
    let sampler = cluster.sampler().expect("sampler");
    let spec = LoadSpec { seed, concurrency: 32, step_deadline: Duration::from_secs(60), spread_over: None };
    let gate = Gate::new(usize::MAX);
    let load = tokio::spawn(drive(cluster.http.clone(), cluster.api(), plan.clone(), spec, gate.clone()));
    gate.reached(600, Duration::from_secs(120)).await;
    let backend = cluster.freeze_consumer_mid_transaction(0).await.expect("freeze");
    let frozen_at = Instant::now();
    // The frozen transaction holds row locks the others need (hot SKUs, checkpoints).
    let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted")
        .bind(backend)
        .fetch_one(&cluster.inventory_db)
        .await
        .expect("locks");
    eprintln!("frozen backend {backend} holds {locks} locks");
    let given_up_before = lock_waits_given_up(&cluster).await;
    let load = load.await.expect("load");
    let loaded_after = frozen_at.elapsed();
    // The others ran into the frozen transaction's locks, gave up waiting (lock timeout) and
    // retried, alive all along.
    for other in &cluster.consumers[1..] {
        assert_eq!(get(&cluster, other.http_port, "/healthz").await.0, 200, "{} stays healthy", other.name);
    }
    // A replica that ran into the locks gives up after the lock timeout (5 s), which may come
    // after the load has ended.
    test_support::eventually("the frozen transaction's locks in the others' way", Duration::from_secs(20), || async {
        (lock_waits_given_up(&cluster).await > given_up_before).then_some(())
    })
    .await;
    let bound = FROZEN_DRAIN_BOUND.saturating_sub(frozen_at.elapsed()).max(Duration::from_secs(20));
    let report =
        settle_and_check(&mut cluster, &plan, load, Injected::default(), sampler, seed, bound).await.expect("check");
    eprintln!("{report}");
    let finished = frozen_at.elapsed();
    assert!(
        report.drained.is_empty(),
        "not drained {finished:?} after the freeze (bound {FROZEN_DRAIN_BOUND:?})\n{report}"
    );
    assert!(report.holds(), "{report}");
    let ended: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
        .bind(backend)
        .fetch_one(&cluster.inventory_db)
        .await
        .expect("backend");
    assert_eq!(ended, 0, "the server ended the frozen transaction's session");
    eprintln!("load ended {loaded_after:?} after the freeze; drained {finished:?} after it");
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_and_a_redis_outage_dead_letter_nothing_even_with_the_tightest_limits() {
    restarts_and_an_outage_dead_letter_nothing(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_and_a_nats_outage_dead_letter_nothing_even_with_the_tightest_limits() {
    restarts_and_an_outage_dead_letter_nothing(Kind::Nats).await;
}

async fn restarts_and_an_outage_dead_letter_nothing(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut spec = RunSpec::ci(seed_from_env());
    spec.cluster.broker = broker;
    spec.orders = 4_000;
    spec.kills = 24;
    spec.relay_freezes = 0;
    spec.broker_crashes = 0;
    spec.postgres_crashes = 0;
    spec.consumer_commit_crashes = 2;
    spec.consumer_freezes = 2;
    spec.broker_outage = Some(Duration::from_secs(20));
    // Stricter than 2: every entry delivered again is past the limit.
    spec.cluster.max_deliveries = Some(1);
    spec.cluster.relay_max_attempts = Some(3);
    spec.cluster.relay_backoff_base = Some(Duration::from_millis(100));
    let (report, cluster): (Report, Cluster) = run(&spec).await.expect("fault run");
    eprintln!("{report}");
    assert!(report.holds(), "{report}");
    let f = &report.findings;
    assert_eq!((f.dead_letters, f.outbox_dead), (0, 0), "{report}");
    assert!(report.injected.process_kills() >= 20, "{report}");
    assert_eq!(report.injected.by_kind.get(crash_of(broker)), Some(&1), "{report}");
    assert!(report.injected.held_by_frozen_consumers > 0, "entries were surely delivered again\n{report}");
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crashed_again_and_again_under_load_loses_nothing() {
    crashed_again_and_again_under_load(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_crashed_again_and_again_under_load_loses_nothing() {
    crashed_again_and_again_under_load(Kind::Nats).await;
}

/// The broker's server `kill -9`ed and restarted on its data 16 times under load, and nothing
/// else: each crash cuts off whatever was in flight (publishes, pulls, acknowledgements), so a
/// consumer left waiting for an answer that died with the server would stop the group for good.
async fn crashed_again_and_again_under_load(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut spec = RunSpec::ci(seed_from_env());
    spec.cluster.broker = broker;
    spec.orders = 4_000;
    (spec.kills, spec.relay_freezes, spec.consumer_freezes) = (0, 0, 0);
    (spec.postgres_crashes, spec.consumer_commit_crashes) = (0, 0);
    spec.broker_crashes = 16;
    let (report, cluster) = run(&spec).await.expect("fault run");
    eprintln!("{report}");
    assert!(report.holds(), "{report}");
    assert_eq!(report.injected.by_kind.get(crash_of(broker)), Some(&16), "{report}");
    cluster.discard_logs();
}

/// The name the report counts `broker`'s server crashes under.
fn crash_of(broker: Kind) -> &'static str {
    match broker {
        Kind::Redis => "kill -9 redis",
        Kind::Nats => "kill -9 nats",
    }
}
