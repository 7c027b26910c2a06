//! Prometheus metrics of the relay.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use service_kit::Shutdown;

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
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
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
            "Failed publish attempts (per event)",
            self.publish_failures.clone(),
        );
        registry.register("outbox_dead_lettered", "Events dead-lettered", self.dead_lettered.clone());
        registry.register(
            "outbox_publish_lag_seconds",
            "Time from outbox insert to publication",
            self.publish_lag_seconds.clone(),
        );
    }

    /// Samples the outbox gauges every `every` until shutdown. The outbox holds only pending
    /// and dead rows, so the scan stays small.
    pub async fn sample_outbox(self, pool: PgPool, every: Duration, shutdown: Shutdown) {
        loop {
            let sample: Result<(i64, i64, Option<f64>), sqlx::Error> = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead'), \
                        EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8 \
                 FROM outbox",
            )
            .fetch_one(&pool)
            .await;
            match sample {
                Ok((pending, dead, oldest)) => {
                    self.pending.set(pending);
                    self.dead.set(dead);
                    self.oldest_pending_age_seconds.set(oldest.unwrap_or(0.0).max(0.0));
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
