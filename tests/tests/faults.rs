//! The CI-size fault run, on each broker: load through the API while relays and consumers are
//! killed, a relay is frozen past its lease, a consumer mid-batch past `CLAIM_MIN_IDLE`, the
//! broker's server and Postgres crash; then nothing may be lost, nothing applied twice and
//! every order's events applied in seq order. Attempts, backoff and deliveries are the shipped
//! defaults.
//!
//! On Redis the broker's crash is `kill -9` of Redis (AOF, `appendfsync always`); on NATS it is
//! `kill -9` of nats-server, whose JetStream keeps the stream and the group's durable consumers
//! on file storage, and which is restarted on that data.
//!
//! `FAULT_SEED=<n>` replays a run; `FAULT_ORDERS=<n>` changes its size (for a quick look).

use broker::Kind;
use system_tests::faults::{run, seed_from_env, RunSpec};
use tokio::sync::Mutex;

/// Each run is a whole cluster of processes; one at a time keeps them fast on small machines.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn ledger_holds_under_faults_on(broker: Kind) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut spec = RunSpec::ci(seed_from_env());
    spec.cluster.broker = broker;
    if let Some(orders) = std::env::var("FAULT_ORDERS").ok().and_then(|n| n.parse().ok()) {
        spec.orders = orders;
    }
    let (report, cluster) = run(&spec).await.expect("fault run");
    eprintln!("{report}");

    let f = &report.findings;
    assert_eq!(f.lost(), 0, "events lost\n{report}");
    assert_eq!(f.double_applied, 0, "events applied twice\n{report}");
    assert!(report.holds(), "{report}");
    // The run is only evidence if the faults really happened under real load.
    assert!(report.injected.process_kills() >= 30, "{report}");
    let (crashed, spared) = match broker {
        Kind::Redis => ("kill -9 redis", "kill -9 nats"),
        Kind::Nats => ("kill -9 nats", "kill -9 redis"),
    };
    assert_eq!(report.injected.by_kind.get(crashed), Some(&1), "{report}");
    assert_eq!(report.injected.by_kind.get(spared), None, "{report}");
    assert_eq!(report.injected.by_kind.get("pg_ctl stop -m immediate"), Some(&1));
    assert_eq!(report.injected.by_kind.get("SIGSTOP relay past lease"), Some(&1));
    assert_eq!(report.injected.by_kind.get("SIGSTOP consumer mid-batch past CLAIM_MIN_IDLE"), Some(&1));
    assert!(f.orders_acknowledged >= spec.orders * 99 / 100, "most orders must get through\n{report}");
    assert!(f.events_published > f.orders_acknowledged, "confirms and cancels happened");
    if broker == Kind::Nats {
        // Every event went through JetStream: nothing touched the (idle) Redis.
        let mut redis = cluster.redis_client().expect("redis").get_multiplexed_async_connection().await.expect("redis");
        let keys: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await.expect("DBSIZE");
        assert_eq!(keys, 0, "a run on NATS wrote to Redis");
    }
    cluster.discard_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_holds_under_kills_freezes_and_server_crashes() {
    ledger_holds_under_faults_on(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_holds_under_kills_freezes_and_server_crashes_on_nats() {
    ledger_holds_under_faults_on(Kind::Nats).await;
}
