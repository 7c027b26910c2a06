//! Latency histograms and error counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, 1 µs ..= 1 h, 3 significant digits.
const HIGHEST_MICROS: u64 = 3_600_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Create,
    Confirm,
    Cancel,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Create, Kind::Confirm, Kind::Cancel];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Confirm => "confirm",
            Kind::Cancel => "cancel",
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("constant histogram bounds are valid")
}

/// Counters the progress line reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// One client's results; merged at the end, so recording takes no lock.
#[derive(Debug)]
pub struct Recorder {
    latency: BTreeMap<Kind, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self { latency: Kind::ALL.iter().map(|k| (*k, new_histogram())).collect(), errors: BTreeMap::new() }
    }
}

impl Recorder {
    pub fn success(&mut self, kind: Kind, latency: Duration, live: &Live) {
        live.ok.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        if let Some(h) = self.latency.get_mut(&kind) {
            h.saturating_record(micros);
        }
    }

    pub fn failure(&mut self, kind: Kind, reason: &str, live: &Live) {
        live.failed.fetch_add(1, Ordering::Relaxed);
        *self.errors.entry(format!("{} {reason}", kind.as_str())).or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        for (kind, h) in other.latency {
            if let Some(mine) = self.latency.get_mut(&kind) {
                mine.add(h).expect("histograms share their bounds");
            }
        }
        for (reason, n) in other.errors {
            *self.errors.entry(reason).or_default() += n;
        }
    }

    pub fn histogram(&self, kind: Kind) -> Option<&Histogram<u64>> {
        self.latency.get(&kind)
    }

    /// All kinds together.
    pub fn overall(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in self.latency.values() {
            all.add(h).expect("histograms share their bounds");
        }
        all
    }

    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let live = Live::default();
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for ms in 1..=90 {
            a.success(Kind::Create, Duration::from_millis(ms), &live);
        }
        for ms in 91..=100 {
            b.success(Kind::Confirm, Duration::from_millis(ms), &live);
        }
        b.failure(Kind::Create, "422", &live);
        b.failure(Kind::Create, "422", &live);
        a.failure(Kind::Cancel, "timeout", &live);
        a.merge(b);
        let all = LatencySummary::of(&a.overall()).expect("values recorded");
        assert_eq!(all.count, 100);
        // 3 significant digits: within 0.1 %.
        assert!((all.p50_ms - 50.0).abs() < 0.1, "{all:?}");
        assert!((all.p90_ms - 90.0).abs() < 0.1, "{all:?}");
        assert!((all.p99_ms - 99.0).abs() < 0.1, "{all:?}");
        assert!((all.max_ms - 100.0).abs() < 0.1, "{all:?}");
        let confirm = LatencySummary::of(a.histogram(Kind::Confirm).expect("kind")).expect("values");
        assert_eq!(confirm.count, 10);
        assert!(LatencySummary::of(a.histogram(Kind::Cancel).expect("kind")).is_none());
        assert_eq!(a.errors().get("create 422"), Some(&2));
        assert_eq!(a.errors().get("cancel timeout"), Some(&1));
        assert_eq!(live.ok.load(Ordering::Relaxed), 100);
        assert_eq!(live.failed.load(Ordering::Relaxed), 3);
    }
}
