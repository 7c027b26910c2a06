//! Prometheus metrics of the relay.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use service_kit::{FailureClass, Shutdown};

/// The values of [`FailureLabels::source`].
const FAILURE_SOURCES: [&str; 4] = ["redis", "nats", "postgres", "row"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub class: FailureClass,
    /// `redis`, `postgres`, or `row` (a row that cannot be published).
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The partition stream.
    pub stream: String,
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The partition stream.
    pub stream: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub pending: Gauge,
    pub in_flight: Gauge,
    pub dead: Gauge,
    pub oldest_pending_age_seconds: Gauge<f64, AtomicU64>,
    pub published: Counter,
    pub claims: Counter,
    pub empty_claims: Counter,
    pub publish_failures: Counter,
    pub dead_lettered: Counter,
    pub publish_lag_seconds: Histogram,
    pub broker_up: Gauge,
    pub broker_outages: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub stream_lengths: Family<StreamLabels, Gauge>,
    pub stream_trimmed: Counter,
    pub group_lag: Family<GroupLabels, Gauge>,
    pub group_pending: Family<GroupLabels, Gauge>,
    pub stream_recoveries: Counter,
    pub stream_recovered_events: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            pending: Gauge::default(),
            in_flight: Gauge::default(),
            dead: Gauge::default(),
            oldest_pending_age_seconds: Gauge::default(),
            published: Counter::default(),
            claims: Counter::default(),
            empty_claims: Counter::default(),
            publish_failures: Counter::default(),
            dead_lettered: Counter::default(),
            // 0.5 ms … ~9 min.
            publish_lag_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 21)),
            broker_up: Gauge::default(),
            broker_outages: Counter::default(),
            failures: Family::default(),
            stream_lengths: Family::default(),
            stream_trimmed: Counter::default(),
            group_lag: Family::default(),
            group_pending: Family::default(),
            stream_recoveries: Counter::default(),
            stream_recovered_events: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        // Every failure series exists from the start, at zero: a rate, a dashboard or an
        // alert over them sees "none yet", not "no such metric".
        for class in FailureClass::ALL {
            for source in FAILURE_SOURCES {
                let _ = self.failures.get_or_create(&FailureLabels { class, source });
            }
        }
        registry.register("outbox_pending", "Pending rows in the outbox (sampled)", self.pending.clone());
        registry.register(
            "outbox_in_flight",
            "Rows claimed by this relay and not yet finished",
            self.in_flight.clone(),
        );
        registry.register("outbox_dead", "Dead rows in the outbox (sampled)", self.dead.clone());
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending row (sampled)",
            self.oldest_pending_age_seconds.clone(),
        );
        registry.register("outbox_published", "Events published", self.published.clone());
        registry.register("outbox_claims", "Claims run", self.claims.clone());
        registry.register(
            "outbox_empty_claims",
            "Claims that found no row at all (another claim had taken them, or none were due)",
            self.empty_claims.clone(),
        );
        registry.register(
            "outbox_publish_failures",
            "Failed publish attempts of events Redis refused (per event; an outage of Redis is no attempt)",
            self.publish_failures.clone(),
        );
        registry.register(
            "outbox_broker_up",
            "1 while Redis takes entries, 0 while the relay backs off because it does not",
            self.broker_up.clone(),
        );
        registry.register("outbox_broker_outages", "Times Redis stopped taking entries", self.broker_outages.clone());
        registry.register(
            "outbox_failures",
            "Failures by class (transient, permanent, bug) and source (redis, postgres, row)",
            self.failures.clone(),
        );
        registry.register("outbox_dead_lettered", "Events dead-lettered", self.dead_lettered.clone());
        registry.register(
            "outbox_stream_length",
            "Entries in each partition stream (XLEN, sampled)",
            self.stream_lengths.clone(),
        );
        registry.register(
            "outbox_stream_trimmed",
            "Stream entries trimmed: acknowledged by every group and older than the retention",
            self.stream_trimmed.clone(),
        );
        registry.register(
            "outbox_stream_group_lag",
            "Entries of the stream not yet delivered to the group (sampled; a group nobody reads keeps growing)",
            self.group_lag.clone(),
        );
        registry.register(
            "outbox_stream_group_pending",
            "Entries delivered to the group's consumers and not acknowledged (sampled)",
            self.group_pending.clone(),
        );
        registry.register(
            "outbox_stream_recoveries",
            "Times Redis was found to have lost the stream's data (its marker gone) and republishing began",
            self.stream_recoveries.clone(),
        );
        registry.register(
            "outbox_stream_recovered_events",
            "Retained events republished after the broker lost the stream's data",
            self.stream_recovered_events.clone(),
        );
        registry.register(
            "outbox_publish_lag_seconds",
            "Time from outbox insert to publication",
            self.publish_lag_seconds.clone(),
        );
    }

    /// Counts one failure.
    pub fn failure(&self, class: FailureClass, source: &'static str) {
        self.failures.get_or_create(&FailureLabels { class, source }).inc();
    }

    /// The length gauge of `stream`; every partition's exists from the start.
    pub fn stream_length(&self, stream: &str) -> Gauge {
        self.stream_lengths.get_or_create(&StreamLabels { stream: stream.to_owned() }).clone()
    }

    /// Records a trimming pass of `stream`: what it trimmed, and the groups as its last call
    /// saw them. `reported` holds the groups its previous pass reported; those that are gone
    /// lose their series.
    pub fn record_trim(
        &self,
        stream: &str,
        pass: &broker::redis::trim::TrimPass,
        reported: &mut std::collections::HashSet<String>,
    ) {
        self.stream_trimmed.inc_by(pass.trimmed);
        let seen: std::collections::HashSet<String> = pass.last.groups.iter().map(|g| g.name.clone()).collect();
        for gone in reported.difference(&seen) {
            let labels = GroupLabels { stream: stream.to_owned(), group: gone.clone() };
            self.group_lag.remove(&labels);
            self.group_pending.remove(&labels);
        }
        *reported = seen;
        for group in &pass.last.groups {
            let labels = GroupLabels { stream: stream.to_owned(), group: group.name.clone() };
            if group.lag.is_none() {
                self.group_lag.remove(&labels);
            }
            if let Some(lag) = group.lag {
                self.group_lag.get_or_create(&labels).set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            self.group_pending.get_or_create(&labels).set(i64::try_from(group.pending).unwrap_or(i64::MAX));
        }
    }

    /// Samples the outbox gauges every `every` until shutdown. The outbox holds only pending
    /// and dead rows, so the scan stays small.
    pub async fn sample_outbox(self, pool: PgPool, every: Duration, shutdown: Shutdown) {
        loop {
            match outbox::stats::sample(&pool).await {
                Ok(sample) => {
                    self.pending.set(sample.pending);
                    self.dead.set(sample.dead);
                    self.oldest_pending_age_seconds.set(sample.oldest_pending_age_seconds);
                }
                Err(e) => tracing::debug!(error = %e, "sampling outbox gauges failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
