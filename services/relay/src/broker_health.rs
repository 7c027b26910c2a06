//! Whether Redis takes entries, as this relay last found. While it does not, the relay backs
//! off as a whole: no pump claims rows (a claim would only be given back, and counting it
//! against the rows would turn an outage into dead letters), `/readyz` says why, and
//! `outbox_broker_up` is 0.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;

/// Shared by the pumps, readiness and metrics. Cloning is cheap.
#[derive(Clone)]
pub struct BrokerHealth {
    outage: Arc<Mutex<Option<Outage>>>,
    metrics: Metrics,
}

struct Outage {
    since: Instant,
    error: String,
}

impl BrokerHealth {
    pub fn new(metrics: Metrics) -> Self {
        metrics.broker_up.set(1);
        Self { outage: Arc::new(Mutex::new(None)), metrics }
    }

    fn outage_mut(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishing failed because of Redis itself.
    pub fn failed(&self, error: &str) {
        let mut outage = self.outage_mut();
        match outage.as_mut() {
            Some(o) => o.error = error.to_owned(),
            None => {
                *outage = Some(Outage { since: Instant::now(), error: error.to_owned() });
                self.metrics.broker_up.set(0);
                self.metrics.broker_outages.inc();
                tracing::warn!(error, "the broker is not taking entries; the relay backs off until it does");
            }
        }
    }

    /// Redis took a batch again (or answers, with nothing to publish).
    pub fn recovered(&self) {
        if let Some(o) = self.outage_mut().take() {
            self.metrics.broker_up.set(1);
            tracing::info!(down_for_ms = o.since.elapsed().as_millis() as u64, "the broker is taking entries again");
        }
    }

    pub fn is_down(&self) -> bool {
        self.outage_mut().is_some()
    }

    /// For how long, and the last error, if Redis is down.
    pub fn outage(&self) -> Option<(Duration, String)> {
        self.outage_mut().as_ref().map(|o| (o.since.elapsed(), o.error.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_counted_once_and_ends_with_a_recovery() {
        let metrics = Metrics::default();
        let broker = BrokerHealth::new(metrics.clone());
        assert_eq!(metrics.broker_up.get(), 1);
        broker.failed("connection refused");
        broker.failed("still refused");
        assert!(broker.is_down());
        assert_eq!(broker.outage().map(|o| o.1).as_deref(), Some("still refused"));
        assert_eq!((metrics.broker_up.get(), metrics.broker_outages.get()), (0, 1));
        broker.recovered();
        assert!(!broker.is_down() && broker.outage().is_none());
        assert_eq!(metrics.broker_up.get(), 1);
    }
}
