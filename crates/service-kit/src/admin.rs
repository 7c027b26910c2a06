//! The admin listener (`ADMIN_ADDR`): `/metrics`, `/healthz` and `/readyz` on an address of
//! their own, which a deployment keeps private while it publishes the service's own
//! listener. The same address as `HTTP_ADDR` means one listener for both.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::http::server::{serve, ServerMetrics};
use crate::http::HttpSettings;
use crate::{Liveness, Readiness, Shutdown, StartError};

/// How long admin connections get to finish at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// The admin listener, bound; `None` inside when it is the service's own listener.
pub struct AdminListener {
    listener: Option<TcpListener>,
}

impl AdminListener {
    /// Binds `admin` (port 0 picks a free port), unless it names `http`'s listener: the same
    /// port on the same address, or with either on every address (`0.0.0.0`, `[::]`).
    pub fn bind(admin: SocketAddr, http: SocketAddr) -> Result<Self, StartError> {
        let same_ip = admin.ip() == http.ip() || admin.ip().is_unspecified() || http.ip().is_unspecified();
        if admin.port() == http.port() && same_ip {
            return Ok(Self { listener: None });
        }
        let listener = crate::http::server::bind(admin).map_err(|source| StartError::Bind { addr: admin, source })?;
        Ok(Self { listener: Some(listener) })
    }

    /// Where it listens; `None` when `/metrics` is on the service's own listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The health routes for the service's own listener, with `/metrics` only when there is
    /// no admin listener of its own.
    pub fn service_routes<S: Clone + Send + Sync + 'static>(
        &self,
        readiness: Readiness,
        liveness: Liveness,
        registry: Arc<Mutex<Registry>>,
    ) -> Router<S> {
        if self.listener.is_some() {
            crate::health::health_router(readiness, liveness, registry)
        } else {
            crate::ops_router(readiness, liveness, registry)
        }
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` (nothing to do when it is
    /// the service's own listener).
    pub fn spawn(
        self,
        readiness: Readiness,
        liveness: Liveness,
        registry: Arc<Mutex<Registry>>,
        metrics: ServerMetrics,
        shutdown: Shutdown,
    ) -> AdminServer {
        let Some(listener) = self.listener else { return AdminServer(None) };
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin listening (/metrics)");
        }
        let router = crate::ops_router::<()>(readiness, liveness, registry);
        AdminServer(Some(tokio::spawn(serve(listener, router, HttpSettings::default(), metrics, shutdown, GRACE))))
    }
}

/// The admin listener being served.
pub struct AdminServer(Option<JoinHandle<std::io::Result<()>>>);

impl AdminServer {
    /// Waits until it has stopped (after its shutdown); a failure is logged, as the service's
    /// work is done by then.
    pub async fn stopped(self) {
        let Some(task) = self.0 else { return };
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the admin listener failed"),
            Err(e) => tracing::warn!(error = %e, "the admin listener's task failed"),
        }
    }
}
