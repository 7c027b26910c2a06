//! Start-up, the router and serving until shutdown.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::middleware;
use axum::Router;
use prometheus_client::registry::Registry;
use service_kit::connections::Connections;
use service_kit::{Readiness, Shutdown};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::DropGuard;

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::orders::Orders;
use crate::{observe, routes};

/// Connections besides the API's: migrations and readiness checks. (The outbox notifier keeps
/// one more of its own.)
const SPARE_CONNECTIONS: u32 = 2;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub orders: Orders,
    pub metrics: Metrics,
    /// Set once the orders schema is migrated; API requests get 503 until then.
    pub migrated: Arc<AtomicBool>,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("invalid DATABASE_URL")]
    DatabaseUrl(#[source] sqlx::Error),
    #[error("serving HTTP failed")]
    Serve(#[source] std::io::Error),
}

/// The whole router: the order API, `/healthz`, `/readyz`, `/metrics`, and problem+json for
/// unknown routes and methods.
pub fn router(state: AppState, readiness: Readiness, registry: Arc<Mutex<Registry>>) -> Router {
    let api = routes::api().route_layer(middleware::from_fn_with_state(state.clone(), observe::guard_api));
    Router::new()
        .merge(api)
        .merge(service_kit::ops_router(readiness, registry))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe::trace_and_measure))
        .with_state(state)
}

/// A started order-service: listening, migrations running in the background.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    pool: PgPool,
    db: Connections,
    shutdown: Shutdown,
    /// Stops the notifier's background task when dropped: after the last request has finished,
    /// since writes that commit while the server drains still need their notifications.
    notifier: DropGuard,
    request_timeout: Duration,
}

impl Application {
    /// Binds the listener and starts background work; Postgres may still be down.
    pub async fn build(config: &Config, shutdown: Shutdown) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| StartupError::Bind { addr: config.http_addr, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| StartupError::Bind { addr: config.http_addr, source })?;
        // Migrations and readiness checks have a small pool of their own, so a saturated API
        // neither delays them nor is delayed by them.
        let pool = service_kit::startup::lazy_pool(&config.database_url, SPARE_CONNECTIONS)
            .map_err(StartupError::DatabaseUrl)?;
        let db = Connections::new(
            pool.connect_options().as_ref().clone(),
            config.database_max_connections,
            Duration::from_secs(5),
        );

        let migrated = Arc::new(AtomicBool::new(false));
        tokio::spawn(migrate(pool.clone(), migrated.clone(), shutdown.clone()));
        let notifier_stop = Shutdown::new();
        let notifier = outbox::Notifier::spawn(pool.clone(), notifier_stop.clone().cancelled_owned());

        let registry = Arc::new(Mutex::new(Registry::default()));
        let metrics = Metrics::register(&registry);
        let schema = migrated.clone();
        let readiness = Readiness::new().postgres(pool.clone()).check("migrations", move || {
            let applied = schema.load(Ordering::Acquire);
            async move {
                if applied {
                    Ok(())
                } else {
                    Err("not applied yet".to_owned())
                }
            }
        });
        let state = AppState {
            orders: Orders::new(db.clone(), notifier),
            metrics,
            migrated,
            request_timeout: config.request_timeout(),
        };
        let router = router(state, readiness, registry);
        Ok(Self {
            listener,
            local_addr,
            router,
            pool,
            db,
            shutdown,
            notifier: notifier_stop.drop_guard(),
            request_timeout: config.request_timeout(),
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The router, for driving the service without a socket.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Serves until shutdown is requested, then lets in-flight requests finish before
    /// returning. Requests are bounded by the request timeout; connections that stay open longer
    /// than that (a client stalling mid-request) are abandoned after a further grace period.
    pub async fn run(self) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, "listening");
        let grace = self.request_timeout + Duration::from_secs(5);
        let serve = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(self.shutdown.clone().cancelled_owned())
            .into_future();
        let deadline = async {
            self.shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let served = tokio::select! {
            served = serve => served.map_err(StartupError::Serve),
            () = deadline => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "connections still open after the grace period; closing them");
                Ok(())
            }
        };
        // Every request is done; release connections, but never hang on an unresponsive server.
        drop(self.notifier);
        let closed = async { tokio::join!(self.db.close(), self.pool.close()) };
        if tokio::time::timeout(Duration::from_secs(5), closed).await.is_err() {
            tracing::warn!("closing database connections timed out");
        }
        tracing::info!("stopped");
        served
    }
}

async fn migrate(pool: PgPool, migrated: Arc<AtomicBool>, shutdown: Shutdown) {
    if service_kit::startup::migrate_with_retry(&pool, &outbox::MIGRATOR, &shutdown).await.is_some() {
        migrated.store(true, Ordering::Release);
        tracing::info!("orders database migrated");
    }
}
