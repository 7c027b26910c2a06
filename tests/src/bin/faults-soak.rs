//! Long fault run: `faults-soak --orders 100000 --duration 10m [--seed N] [--broker nats]`.
//!
//! The same suite as the CI run, with the orders spread over `--duration` and a kill about
//! every `--kill-every`. Exits non-zero if the ledger does not hold.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use system_tests::faults::{run, seed_from_env, RunSpec};

#[derive(Debug, Parser)]
#[command(about = "Fault-injection soak run against the real binaries")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    orders: usize,
    /// How long the load lasts, e.g. `10m`, `90s`.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the plan and the fault schedule (default: `FAULT_SEED` or random).
    #[arg(long, env = "FAULT_SEED")]
    seed: Option<u64>,
    /// Average time between process kills.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_every: Duration,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The broker the events go through (its server is among what crashes).
    #[arg(long, value_enum, default_value_t = broker::Kind::Redis)]
    broker: broker::Kind,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}`: expected e.g. 90s or 10m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unit must be s, m or h")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spec = RunSpec::ci(args.seed.unwrap_or_else(seed_from_env));
    let minutes = (args.duration.as_secs() / 60).max(1) as usize;
    spec.orders = args.orders;
    spec.concurrency = args.concurrency;
    spec.spread_over = Some(args.duration);
    spec.cluster.broker = args.broker;
    spec.kills = (args.duration.as_secs() / args.kill_every.as_secs().max(1)).max(1) as usize;
    // Server crashes and freezes scale with the length of the run: about one of each per 3 min.
    spec.broker_crashes = minutes.div_ceil(3);
    spec.postgres_crashes = minutes.div_ceil(3);
    spec.relay_freezes = minutes.div_ceil(3);
    spec.consumer_commit_crashes = minutes.div_ceil(2);
    spec.drain_timeout = Duration::from_secs(600);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let (report, cluster) = runtime.block_on(run(&spec)).context("fault run")?;
    println!("{report}");
    if report.holds() {
        cluster.discard_logs();
        Ok(())
    } else {
        anyhow::bail!("ledger broken (services' logs kept in {})", cluster.log_dir.display())
    }
}
