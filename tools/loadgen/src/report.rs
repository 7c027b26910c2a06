//! The run's summary, as text for people and JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::e2e::EndToEnd;
use crate::relays::RelayShare;
use crate::stats::{Kind, LatencySummary, Recorder};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Offered orders/s (open loop); None = as fast as possible.
    pub target_rate: Option<f64>,
    pub concurrency: usize,
    pub elapsed_s: f64,
    pub orders_started: u64,
    pub orders_created: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// All requests (ok and failed) per second of the run.
    pub requests_per_s: f64,
    /// Successful creates per second of the run.
    pub orders_per_s: f64,
    /// Successful requests of every kind. Creates are measured from their due time.
    pub latency: Option<LatencySummary>,
    pub latency_by_kind: BTreeMap<Kind, LatencySummary>,
    /// "<kind> <status>" → count, e.g. "create 503", "confirm timeout".
    pub errors: BTreeMap<String, u64>,
    pub end_to_end: Option<EndToEnd>,
    pub end_to_end_error: Option<String>,
    pub relays: Vec<RelayShare>,
}

impl Report {
    pub fn new(
        config: &Config,
        elapsed: Duration,
        orders_started: u64,
        recorder: &Recorder,
        end_to_end: Option<Result<EndToEnd, String>>,
        relays: Vec<RelayShare>,
    ) -> Self {
        let latency_by_kind: BTreeMap<Kind, LatencySummary> = Kind::ALL
            .iter()
            .filter_map(|k| recorder.histogram(*k).and_then(LatencySummary::of).map(|s| (*k, s)))
            .collect();
        let requests_ok: u64 = latency_by_kind.values().map(|s| s.count).sum();
        let requests_failed: u64 = recorder.errors().values().sum();
        let orders_created = latency_by_kind.get(&Kind::Create).map_or(0, |s| s.count);
        let secs = elapsed.as_secs_f64().max(f64::EPSILON);
        let (end_to_end, end_to_end_error) = match end_to_end {
            Some(Ok(e)) => (Some(e), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        Self {
            target_rate: config.rate,
            concurrency: config.concurrency,
            elapsed_s: elapsed.as_secs_f64(),
            orders_started,
            orders_created,
            requests_ok,
            requests_failed,
            requests_per_s: (requests_ok + requests_failed) as f64 / secs,
            orders_per_s: orders_created as f64 / secs,
            latency: LatencySummary::of(&recorder.overall()),
            latency_by_kind,
            errors: recorder.errors().clone(),
            end_to_end,
            end_to_end_error,
            relays,
        }
    }
}

fn latency_line(out: &mut String, label: &str, s: &LatencySummary) -> fmt::Result {
    writeln!(
        out,
        "  {label:<10} n={:<8} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let mode = self.target_rate.map_or("as fast as possible".to_owned(), |r| format!("{r} orders/s offered"));
        writeln!(out, "load: {mode}, {} clients, {:.2} s", self.concurrency, self.elapsed_s)?;
        writeln!(
            out,
            "orders: {} started, {} created ({:.1}/s); requests: {} ok, {} failed ({:.1}/s)",
            self.orders_started,
            self.orders_created,
            self.orders_per_s,
            self.requests_ok,
            self.requests_failed,
            self.requests_per_s
        )?;
        writeln!(out, "API latency (successful requests):")?;
        if let Some(all) = &self.latency {
            latency_line(&mut out, "all", all)?;
        }
        for (kind, s) in &self.latency_by_kind {
            latency_line(&mut out, kind.as_str(), s)?;
        }
        if !self.errors.is_empty() {
            writeln!(out, "errors:")?;
            for (reason, n) in &self.errors {
                writeln!(out, "  {reason:<20} {n}")?;
            }
        }
        if let Some(e) = &self.end_to_end {
            writeln!(
                out,
                "end to end (outbox created_at -> consumer processed_at): {}/{} events applied",
                e.applied, e.events
            )?;
            if let Some(s) = &e.latency {
                latency_line(&mut out, "events", s)?;
            }
        }
        if let Some(e) = &self.end_to_end_error {
            writeln!(out, "end to end: not measured: {e}")?;
        }
        if !self.relays.is_empty() {
            writeln!(out, "published per relay during the run:")?;
            for r in &self.relays {
                let n = r.published.map_or("unreadable".to_owned(), |n| format!("{n:.0}"));
                writeln!(out, "  {:<40} {n}", r.url)?;
            }
        }
        f.write_str(&out)
    }
}
