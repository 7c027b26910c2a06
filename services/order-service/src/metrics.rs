//! Prometheus metrics of the API. Labels are bounded: route templates, not paths.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use service_kit::FailureClass;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// One of the standard methods, or `other` ([`service_kit::http::method_label`]).
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    class: FailureClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    to: &'static str,
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    durations: DurationFamily,
    orders_created: Counter,
    transitions: Family<TransitionLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    pub idempotency_keys_expired: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Arc<Mutex<Registry>>) -> Self {
        let metrics = Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))),
            orders_created: Counter::default(),
            transitions: Family::default(),
            failures: Family::default(),
            idempotency_keys_expired: Counter::default(),
        };
        // The failure series exist from the start, at zero (answered 503, answered 500).
        for class in [FailureClass::transient, FailureClass::bug] {
            let _ = metrics.failures.get_or_create(&FailureLabels { class });
        }
        // A poisoned registry only means another thread panicked while registering; the
        // registry itself is still usable.
        let mut registry = registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        registry.register("http_server_requests", "HTTP requests served", metrics.requests.clone());
        registry.register_with_unit(
            "http_server_request_duration",
            "Time to serve an HTTP request",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        registry.register("orders_created", "Orders created", metrics.orders_created.clone());
        registry.register("order_transitions", "Order status changes, by new status", metrics.transitions.clone());
        registry.register(
            "api_failures",
            "Requests that failed on the service's side, by class (transient: 503; bug: 500)",
            metrics.failures.clone(),
        );
        registry.register(
            "idempotency_keys_expired",
            "Idempotency keys removed after IDEMPOTENCY_KEY_TTL",
            metrics.idempotency_keys_expired.clone(),
        );
        metrics
    }

    pub fn observe_request(&self, method: &'static str, route: &str, status: u16, elapsed: Duration) {
        let route = route.to_owned();
        self.durations.get_or_create(&RouteLabels { method, route: route.clone() }).observe(elapsed.as_secs_f64());
        self.requests.get_or_create(&RequestLabels { method, route, status }).inc();
    }

    pub fn failure(&self, class: FailureClass) {
        self.failures.get_or_create(&FailureLabels { class }).inc();
    }

    pub fn order_created(&self) {
        self.orders_created.inc();
    }

    pub fn order_transitioned(&self, to: domain::OrderStatus) {
        self.transitions.get_or_create(&TransitionLabels { to: to.as_str() }).inc();
    }
}
