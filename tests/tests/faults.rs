//! The CI-size fault run: load through the API while relays and consumers are killed, a relay
//! is frozen past its lease, a consumer mid-batch past `CLAIM_MIN_IDLE`, Redis and Postgres
//! crash; then nothing may be lost, nothing applied twice and every order's events applied in
//! seq order. Attempts, backoff and deliveries are the shipped defaults.
//!
//! `FAULT_SEED=<n>` replays a run; `FAULT_ORDERS=<n>` changes its size (for a quick look).

use system_tests::faults::{run, seed_from_env, RunSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_holds_under_kills_freezes_and_server_crashes() {
    let mut spec = RunSpec::ci(seed_from_env());
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
    assert_eq!(report.injected.by_kind.get("kill -9 redis"), Some(&1));
    assert_eq!(report.injected.by_kind.get("pg_ctl stop -m immediate"), Some(&1));
    assert_eq!(report.injected.by_kind.get("SIGSTOP relay past lease"), Some(&1));
    assert_eq!(report.injected.by_kind.get("SIGSTOP consumer mid-batch past CLAIM_MIN_IDLE"), Some(&1));
    assert!(f.orders_acknowledged >= spec.orders * 99 / 100, "most orders must get through\n{report}");
    assert!(f.events_published > f.orders_acknowledged, "confirms and cancels happened");
    cluster.discard_logs();
}
