//! Prometheus metrics of the consumer.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use service_kit::FailureClass;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum EventResult {
    applied,
    duplicate,
    deferred,
    dead,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: EventResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    class: FailureClass,
    /// `redis`, `postgres` (a batch), or `entry` (one entry applied on its own).
    source: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    events: Family<ResultLabel, Counter>,
    pub end_to_end_latency: Histogram,
    /// Per partition stream.
    pending_entries: Family<StreamLabels, Gauge>,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
    failures: Family<FailureLabels, Counter>,
    pub redelivered: Counter,
    pub entries_gone: Counter,
    pub consumers_removed: Counter,
    pub pruned_processed: Counter,
    pub pruned_closed_orders: Counter,
    pub pruned_dead_letters: Counter,
    pub parked: Gauge,
    pub parked_oldest_age_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// The gauge of entries of `stream` pending at this replica (each partition's exists from
    /// the start).
    pub fn pending_entries(&self, stream: &str) -> Gauge {
        self.pending_entries.get_or_create(&StreamLabels { stream: stream.to_owned() }).clone()
    }

    pub fn register(registry: &Arc<Mutex<Registry>>) -> Self {
        let metrics = Self {
            events: Family::default(),
            end_to_end_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            pending_entries: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            batch_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            failures: Family::default(),
            redelivered: Counter::default(),
            entries_gone: Counter::default(),
            consumers_removed: Counter::default(),
            pruned_processed: Counter::default(),
            pruned_closed_orders: Counter::default(),
            pruned_dead_letters: Counter::default(),
            parked: Gauge::default(),
            parked_oldest_age_seconds: Gauge::default(),
        };
        // Every result and failure series exists from the start, at zero: a rate, a dashboard
        // or an alert over them sees "none yet", not "no such metric".
        for result in [EventResult::applied, EventResult::duplicate, EventResult::deferred, EventResult::dead] {
            let _ = metrics.events.get_or_create(&ResultLabel { result });
        }
        for class in FailureClass::ALL {
            for source in ["redis", "nats", "postgres", "entry"] {
                let _ = metrics.failures.get_or_create(&FailureLabels { class, source });
            }
        }
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
            "Entries of each partition stream delivered to this replica and not yet acknowledged (sampled)",
            metrics.pending_entries.clone(),
        );
        r.register("consumer_batch_size", "Entries per batch", metrics.batch_size.clone());
        r.register(
            "consumer_batch_duration_seconds",
            "Time to apply and acknowledge a batch",
            metrics.batch_duration.clone(),
        );
        r.register(
            "consumer_failures",
            "Failures by class (transient, permanent, bug) and source (redis, postgres, entry)",
            metrics.failures.clone(),
        );
        r.register(
            "consumer_redelivered",
            "Entries handled that Redis had delivered before (restarts, claims, failed tries)",
            metrics.redelivered.clone(),
        );
        r.register(
            "consumer_entries_gone",
            "Pending entries found no longer on the stream (deleted or lost by Redis), acknowledged or dropped from the pending list; each is logged with its id",
            metrics.entries_gone.clone(),
        );
        r.register(
            "consumer_departed_consumers_removed",
            "Consumers removed from the group: nothing pending and idle longer than CONSUMER_DEPARTED_AFTER",
            metrics.consumers_removed.clone(),
        );
        r.register(
            "consumer_pruned_processed_messages",
            "Dedupe rows removed after DEDUPE_RETENTION",
            metrics.pruned_processed.clone(),
        );
        r.register(
            "consumer_pruned_closed_orders",
            "Checkpoints and reservations of cancelled orders removed after DEDUPE_RETENTION",
            metrics.pruned_closed_orders.clone(),
        );
        r.register(
            "consumer_pruned_dead_letters",
            "Dead letters removed after DEAD_LETTER_RETENTION",
            metrics.pruned_dead_letters.clone(),
        );
        r.register(
            "consumer_parked_events",
            "Events parked waiting for their predecessor (sampled)",
            metrics.parked.clone(),
        );
        r.register(
            "consumer_parked_oldest_age_seconds",
            "How long the oldest parked event has waited (sampled); growing: a gap that is not filling",
            metrics.parked_oldest_age_seconds.clone(),
        );
        metrics
    }

    pub fn failure(&self, class: FailureClass, source: &'static str) {
        self.failures.get_or_create(&FailureLabels { class, source }).inc();
    }

    pub fn count(&self, result: EventResult, n: u64) {
        if n > 0 {
            self.events.get_or_create(&ResultLabel { result }).inc_by(n);
        }
    }
}
