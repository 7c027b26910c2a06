//! Prometheus metrics of the consumer.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum EventResult {
    applied,
    duplicate,
    deferred,
    dead,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: EventResult,
}

#[derive(Clone)]
pub struct Metrics {
    events: Family<ResultLabel, Counter>,
    pub end_to_end_latency: Histogram,
    pub pending_entries: Gauge,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
}

impl Metrics {
    pub fn register(registry: &Arc<Mutex<Registry>>) -> Self {
        let metrics = Self {
            events: Family::default(),
            end_to_end_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            pending_entries: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            batch_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        // A poisoned lock only means another thread panicked while registering; the registry
        // itself is still usable.
        let mut r = registry.lock().unwrap_or_else(|e| e.into_inner());
        r.register("consumer_events", "Stream entries handled, by result", metrics.events.clone());
        r.register(
            "consumer_end_to_end_latency_seconds",
            "From the event's occurred_at to its effect committed",
            metrics.end_to_end_latency.clone(),
        );
        r.register(
            "consumer_pending_entries",
            "Entries delivered to this replica and not yet acknowledged (sampled)",
            metrics.pending_entries.clone(),
        );
        r.register("consumer_batch_size", "Entries per batch", metrics.batch_size.clone());
        r.register(
            "consumer_batch_duration_seconds",
            "Time to apply and acknowledge a batch",
            metrics.batch_duration.clone(),
        );
        metrics
    }

    pub fn count(&self, result: EventResult, n: u64) {
        if n > 0 {
            self.events.get_or_create(&ResultLabel { result }).inc_by(n);
        }
    }
}
