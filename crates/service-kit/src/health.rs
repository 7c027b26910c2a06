use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

use crate::Liveness;

type Check = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The dependency checks behind `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
    /// Lines `/readyz` adds to its body whatever the checks say (a setting to be aware of).
    notes: Vec<String>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a named check; it should answer quickly (it runs under a 2 s timeout).
    pub fn check<F, Fut>(mut self, name: &'static str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name, Arc::new(move || Box::pin(f()))));
        self
    }

    /// Adds a line to every `/readyz` body.
    pub fn note(mut self, line: impl Into<String>) -> Self {
        self.notes.push(line.into());
        self
    }

    /// Postgres is reachable through `pool`.
    pub fn postgres(self, pool: sqlx::PgPool) -> Self {
        self.check("postgres", move || {
            let pool = pool.clone();
            async move { sqlx::query!("SELECT 1 AS one").fetch_one(&pool).await.map(drop).map_err(|e| e.to_string()) }
        })
    }

    /// Runs every check; the failures, by name.
    pub async fn failures(&self) -> Vec<(&'static str, String)> {
        let runs = self.checks.iter().map(|(name, check)| async move {
            match tokio::time::timeout(std::time::Duration::from_secs(2), check()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((*name, e)),
                Err(_) => Some((*name, "timed out".to_owned())),
            }
        });
        futures::future::join_all(runs).await.into_iter().flatten().collect()
    }
}

#[derive(Clone)]
pub(crate) struct OpsState {
    readiness: Readiness,
    liveness: Liveness,
    registry: Arc<Mutex<Registry>>,
}

/// `/healthz` (the process and its work loops: 503 naming a loop that stalled), `/readyz` and
/// `/metrics`, to merge into a service's router.
pub fn ops_router<S: Clone + Send + Sync + 'static>(
    readiness: Readiness,
    liveness: Liveness,
    registry: Arc<Mutex<Registry>>,
) -> Router<S> {
    health_routes().route("/metrics", get(metrics)).with_state(OpsState { readiness, liveness, registry })
}

/// `/healthz` and `/readyz` only: what a service's own listener serves when `/metrics` is on
/// the admin listener ([`crate::admin`]).
pub fn health_router<S: Clone + Send + Sync + 'static>(
    readiness: Readiness,
    liveness: Liveness,
    registry: Arc<Mutex<Registry>>,
) -> Router<S> {
    health_routes().with_state(OpsState { readiness, liveness, registry })
}

fn health_routes() -> Router<OpsState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "The process runs and its work loops make progress", body = String, content_type = "text/plain"),
        (status = 503, description = "A work loop has not come round within its bound; one line per loop", body = String, content_type = "text/plain"),
    ))]
pub(crate) async fn healthz(State(state): State<OpsState>) -> impl IntoResponse {
    let stalled = state.liveness.stalled();
    if stalled.is_empty() {
        return (StatusCode::OK, "ok".to_owned());
    }
    let text = stalled
        .iter()
        .map(|(name, since)| format!("{name}: no progress for {:.1}s", since.as_secs_f64()))
        .collect::<Vec<_>>()
        .join("\n");
    (StatusCode::SERVICE_UNAVAILABLE, text)
}

/// Readiness.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every dependency is reachable (`ready`, then notes such as authentication being off)", body = String, content_type = "text/plain"),
        (status = 503, description = "One line per failing check", body = String, content_type = "text/plain"),
    ))]
pub(crate) async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let failures = state.readiness.failures().await;
    let notes = state.readiness.notes.iter().cloned();
    if failures.is_empty() {
        let text = std::iter::once("ready".to_owned()).chain(notes).collect::<Vec<_>>().join("\n");
        (StatusCode::OK, text)
    } else {
        let text = failures.iter().map(|(n, e)| format!("{n}: {e}")).chain(notes).collect::<Vec<_>>().join("\n");
        (StatusCode::SERVICE_UNAVAILABLE, text)
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = String::new();
    let encoded = match state.registry.lock() {
        Ok(registry) => prometheus_client::encoding::text::encode(&mut body, &registry).is_ok(),
        Err(_) => false,
    };
    if !encoded {
        return (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new());
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}
