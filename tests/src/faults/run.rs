//! A whole fault run: start the cluster, load it while the schedule attacks it, drain, check.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::checker::{check, DedupeRecord, Findings};
use super::cluster::{Cluster, ClusterSpec};
use super::drain::{drain, Backlog, Redeliveries, RedeliverySampler};
use super::inject::{restart_crashed, run_schedule, Injected};
use super::load::{drive, Gate, LoadSpec};
use super::plan::{self, PlannedOrder};
use super::schedule::{self, ScheduleSpec};
use super::FaultError;

#[derive(Debug, Clone)]
pub struct RunSpec {
    pub seed: u64,
    pub orders: usize,
    pub concurrency: usize,
    pub kills: usize,
    pub relay_freezes: usize,
    pub consumer_freezes: usize,
    /// Crashes of the broker's server (Redis, or nats-server).
    pub broker_crashes: usize,
    pub postgres_crashes: usize,
    pub consumer_commit_crashes: usize,
    /// One broker crash that stays down this long, besides the short ones.
    pub broker_outage: Option<Duration>,
    pub spread_over: Option<Duration>,
    pub drain_timeout: Duration,
    pub cluster: ClusterSpec,
}

impl RunSpec {
    /// The CI-size run (see docs/RELIABILITY.md for how the size was chosen).
    pub fn ci(seed: u64) -> Self {
        Self {
            seed,
            orders: 10_000,
            concurrency: 32,
            kills: 32,
            relay_freezes: 1,
            consumer_freezes: 1,
            broker_crashes: 1,
            postgres_crashes: 1,
            consumer_commit_crashes: 2,
            broker_outage: None,
            spread_over: None,
            drain_timeout: Duration::from_secs(120),
            cluster: ClusterSpec::default(),
        }
    }
}

/// `FAULT_SEED` if set (to replay a run), else a fresh one.
pub fn seed_from_env() -> u64 {
    std::env::var("FAULT_SEED").ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| rand::random::<u32>().into())
}

#[derive(Debug, Clone)]
pub struct Report {
    pub broker: ::broker::Kind,
    pub seed: u64,
    pub orders_planned: usize,
    pub requests: u64,
    pub request_retries: u64,
    pub load_time: Duration,
    pub drain_time: Duration,
    pub drained: Backlog,
    pub injected: Injected,
    pub stream_entries: usize,
    pub stream_distinct_events: usize,
    pub redeliveries: Redeliveries,
    pub anomalies: Vec<String>,
    pub findings: Findings,
}

impl Report {
    pub fn duplicate_entries(&self) -> usize {
        self.stream_entries.saturating_sub(self.stream_distinct_events)
    }

    /// Nothing lost, nothing applied twice, order kept, and the API kept its word.
    pub fn holds(&self) -> bool {
        self.findings.holds()
            && self.anomalies.is_empty()
            && self.drained.is_empty()
            && self.injected.unexpected_exits.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let f = &self.findings;
        writeln!(out, "fault run on {}, seed {} (FAULT_SEED={} reproduces it)", self.broker, self.seed, self.seed)?;
        writeln!(out, "  load: {} orders planned, {} acknowledged, {} in database, {} requests ({} retries), {} unknown steps, {:.1}s", self.orders_planned, f.orders_acknowledged, f.orders_in_database, self.requests, self.request_retries, f.unknown_steps, self.load_time.as_secs_f64())?;
        writeln!(out, "  events: {} published, {} applied ({} by the consumers' count; dedupe record {:?}); stream {} entries, {} duplicate entries; redeliveries: {} entries seen redelivered, {} duplicates skipped by consumers", f.events_published, f.events_processed, self.redeliveries.applied_reported, f.dedupe, self.stream_entries, self.duplicate_entries(), self.redeliveries.entries_seen_redelivered, self.redeliveries.duplicates_skipped)?;
        writeln!(out, "  faults: {} process kills", self.injected.process_kills())?;
        for (kind, n) in &self.injected.by_kind {
            writeln!(out, "    {n:>4} × {kind}")?;
        }
        writeln!(
            out,
            "    applied-but-unacknowledged entries at consumer crashes: {}; entries held by consumers frozen mid-batch: {}",
            self.injected.applied_unacked_at_crash, self.injected.held_by_frozen_consumers
        )?;
        writeln!(out, "    services that exited by themselves: {:?}", self.injected.unexpected_exits)?;
        writeln!(out, "  drain: {:.1}s, left {:?}", self.drain_time.as_secs_f64(), self.drained)?;
        writeln!(
            out,
            "  lost: {} (orders {}, events not published {}, events not applied {}, orders missing effects {})",
            f.lost(),
            f.lost_orders,
            f.missing_events,
            f.unapplied_events,
            f.orders_missing_effects
        )?;
        writeln!(out, "  double-applied: {}; applied again (consumers' own count): {}; out of seq order: {}; wrong effects: {}; checkpoint mismatches: {}; status mismatches: {}; sequence errors: {}", f.double_applied, f.reapplied, f.reordered, f.orders_wrong_effects, f.checkpoint_mismatches, f.status_mismatches, f.sequence_errors)?;
        writeln!(out, "  shared-SKU mismatches: {}; phantom events: {}; parked left: {}; outbox pending {} dead {}; dead letters: {}", f.inventory_mismatches, f.phantom_events, f.parked_left, f.outbox_pending_left, f.outbox_dead, f.dead_letters)?;
        for a in self.anomalies.iter().take(10) {
            writeln!(out, "  API anomaly: {a}")?;
        }
        for e in &f.examples {
            writeln!(out, "  e.g. {e}")?;
        }
        write!(out, "  verdict: {}", if self.holds() { "ledger holds" } else { "LEDGER BROKEN" })
    }
}

/// Drains, then checks and counts: the end of every run, with or without faults.
pub async fn settle_and_check(
    cluster: &mut Cluster,
    plan: &[PlannedOrder],
    load: super::load::LoadOutcome,
    injected: Injected,
    sampler: RedeliverySampler,
    seed: u64,
    drain_timeout: Duration,
) -> Result<Report, FaultError> {
    let mut injected = injected;
    restart_crashed(cluster, &mut injected)?;
    let broker = cluster.probe()?;
    let (drained, drain_time) = drain(&cluster.orders_db, &cluster.inventory_db, &broker, drain_timeout).await;
    let redeliveries = sampler.finish().await;
    let (stream_entries, stream_distinct_events) = broker.connect().await?.census().await?;
    let initial = plan::initial_stock(plan);
    let dedupe = if cluster.spec.dedupe_retention.is_some() { DedupeRecord::Pruned } else { DedupeRecord::Kept };
    let mut findings = check(plan, &load.ledger, &cluster.orders_db, &cluster.inventory_db, &initial, dedupe).await?;
    // Each event applies once: as often as there are dedupe rows, or (pruned) published events.
    let applied_once = match dedupe {
        DedupeRecord::Kept => findings.events_processed,
        DedupeRecord::Pruned => findings.events_published,
    };
    findings.reapplied = redeliveries.applied_reported.saturating_sub(applied_once as u64);
    Ok(Report {
        broker: cluster.spec.broker,
        seed,
        orders_planned: plan.len(),
        requests: load.requests,
        request_retries: load.retries,
        load_time: load.elapsed,
        drain_time,
        drained,
        injected,
        stream_entries,
        stream_distinct_events,
        redeliveries,
        anomalies: load.anomalies,
        findings,
    })
}

/// The end of a run without injected faults: drain (at most `drain_timeout`), check, and
/// print the report.
pub async fn settle(
    cluster: &mut Cluster,
    plan: &[PlannedOrder],
    load: super::load::LoadOutcome,
    seed: u64,
    drain_timeout: Duration,
) -> Result<Report, FaultError> {
    let sampler = cluster.sampler()?;
    let report = settle_and_check(cluster, plan, load, Injected::default(), sampler, seed, drain_timeout).await?;
    eprintln!("{report}");
    Ok(report)
}

/// Starts a cluster with its stock for `plan`.
pub async fn start_cluster(spec: ClusterSpec, plan: &[PlannedOrder]) -> Result<Cluster, FaultError> {
    let cluster = Cluster::start(spec).await?;
    cluster.seed_stock(&plan::initial_stock(plan)).await?;
    Ok(cluster)
}

/// The full run: load and faults together, then drain and check.
pub async fn run(spec: &RunSpec) -> Result<(Report, Cluster), FaultError> {
    eprintln!(
        "fault run on {}: seed {} (set FAULT_SEED={} to reproduce), {} orders",
        spec.cluster.broker, spec.seed, spec.seed, spec.orders
    );
    let plan = Arc::new(plan::generate(spec.seed, spec.orders));
    let schedule = schedule::generate(
        spec.seed,
        &ScheduleSpec {
            orders: spec.orders,
            relays: spec.cluster.relays,
            consumers: spec.cluster.consumers,
            broker: spec.cluster.broker,
            kills: spec.kills,
            relay_freezes: spec.relay_freezes,
            consumer_freezes: spec.consumer_freezes,
            broker_crashes: spec.broker_crashes,
            postgres_crashes: spec.postgres_crashes,
            consumer_commit_crashes: spec.consumer_commit_crashes,
            broker_outage: spec.broker_outage,
            relay_lease: spec.cluster.relay_lease.unwrap_or(Duration::from_secs(30)),
            claim_min_idle: spec.cluster.claim_min_idle.unwrap_or(Duration::from_secs(30)),
        },
    );
    let mut cluster = start_cluster(spec.cluster.clone(), &plan).await?;
    eprintln!("services' logs: {}", cluster.log_dir.display());
    let sampler = cluster.sampler()?;
    let gate = Gate::new(schedule.first().map_or(usize::MAX, |s| s.at_order + 1));
    let load_spec = LoadSpec {
        seed: spec.seed,
        concurrency: spec.concurrency,
        step_deadline: Duration::from_secs(60),
        spread_over: spec.spread_over,
    };
    let load = tokio::spawn(drive(cluster.http.clone(), cluster.api(), plan.clone(), load_spec, gate.clone()));
    let injected = run_schedule(&mut cluster, &schedule, &gate).await;
    gate.open_to(usize::MAX);
    let load = load.await.map_err(|e| FaultError::Setup(format!("load task: {e}")))?;
    let report = settle_and_check(&mut cluster, &plan, load, injected?, sampler, spec.seed, spec.drain_timeout).await?;
    Ok((report, cluster))
}
