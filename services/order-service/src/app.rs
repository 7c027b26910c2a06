//! Binding, the router, and running until shutdown ([`service_kit::runner`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::middleware;
use axum::Router;
use prometheus_client::registry::Registry;
use service_kit::connections::Connections;
use service_kit::http::body::{read_within, BodyLimits};
use service_kit::http::server::{serve, ServerMetrics};
use service_kit::http::HttpSettings;
use service_kit::runner::{drain, TaskTracker, TASKS_GRACE};
use service_kit::{Liveness, Readiness, Service, Shutdown, StartError};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::DropGuard;

use crate::body::MAX_BODY_BYTES;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::orders::Orders;
use crate::{observe, routes};

/// Connections besides the API's: migrations, readiness checks, key expiry and the upkeep of
/// `idempotency_keys` (a vacuum may hold one for a while). (The outbox notifier keeps one more
/// of its own.)
const SPARE_CONNECTIONS: u32 = 3;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub orders: Orders,
    pub metrics: Metrics,
    /// Set once the orders schema is migrated; API requests get 503 until then.
    pub migrated: Arc<AtomicBool>,
    pub request_timeout: Duration,
}

/// The whole router: the order API, `/healthz`, `/readyz`, `/metrics`, and problem+json for
/// unknown routes and methods. Every request's body is read within the body timeout first.
pub fn router(state: AppState, readiness: Readiness, registry: Arc<Mutex<Registry>>, http: &HttpSettings) -> Router {
    let api = routes::api().route_layer(middleware::from_fn_with_state(state.clone(), observe::guard_api));
    let body_limits = BodyLimits { timeout: http.body_timeout, max_bytes: MAX_BODY_BYTES };
    Router::new()
        .merge(api)
        .merge(service_kit::ops_router(readiness, Liveness::new(), registry))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(body_limits, read_within))
        .layer(middleware::from_fn_with_state(state.clone(), observe::trace_and_measure))
        .with_state(state)
}

/// A bound order-service: listening, not yet serving; Postgres may still be down.
pub struct OrderService {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    pool: PgPool,
    db: Connections,
    migrated: Arc<AtomicBool>,
    metrics: Metrics,
    /// Stops the notifier's background task when dropped: after the last request has finished,
    /// since writes that commit while the server drains still need their notifications.
    notifier: DropGuard,
    request_timeout: Duration,
    http: HttpSettings,
    upkeep_interval: Duration,
    idempotency_key_ttl: Duration,
    server_metrics: ServerMetrics,
}

impl OrderService {
    /// Binds the listener and builds the router; nothing runs until [`Service::run`].
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listener = service_kit::http::server::bind(config.http_addr)
            .map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        // Migrations and readiness checks have a small pool of their own, so a saturated API
        // neither delays them nor is delayed by them.
        let options = config.database_url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
        let options = config.session_limits().apply(options, Self::NAME);
        let pool = service_kit::startup::lazy_pool_with(options, SPARE_CONNECTIONS);
        let db = Connections::new(
            pool.connect_options().as_ref().clone(),
            config.database_max_connections,
            Duration::from_secs(5),
        );

        let migrated = Arc::new(AtomicBool::new(false));
        let notifier_stop = Shutdown::new();
        let notifier = outbox::Notifier::spawn(pool.clone(), notifier_stop.clone().cancelled_owned());

        let registry = Arc::new(Mutex::new(Registry::default()));
        let metrics = Metrics::register(&registry);
        let server_metrics = ServerMetrics::register(&mut registry.lock().unwrap_or_else(|e| e.into_inner()));
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
            orders: Orders::new(db.clone(), notifier, config.idempotency_key_ttl),
            metrics: metrics.clone(),
            migrated: migrated.clone(),
            request_timeout: config.request_timeout(),
        };
        let router = router(state, readiness, registry, &config.http);
        Ok(Self {
            listener,
            local_addr,
            router,
            pool,
            db,
            migrated,
            metrics,
            notifier: notifier_stop.drop_guard(),
            request_timeout: config.request_timeout(),
            http: config.http.clone(),
            upkeep_interval: config.upkeep_interval,
            idempotency_key_ttl: config.idempotency_key_ttl,
            server_metrics,
        })
    }

    /// The router, for driving the service without a socket.
    pub fn router(&self) -> Router {
        self.router.clone()
    }
}

impl Service for OrderService {
    const NAME: &'static str = "order-service";

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Applies the migrations (API requests get 503 until then) and serves until shutdown is
    /// requested, then lets in-flight requests finish before returning. Requests are bounded by
    /// the body and request timeouts; connections still open after those and a further grace
    /// period (a client stalling mid-request) are closed.
    async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let tasks = TaskTracker::new();
        tasks.spawn(migrate(self.pool.clone(), self.migrated.clone(), shutdown.clone()));
        tasks.spawn(service_kit::upkeep::upkeep_loop(
            self.pool.clone(),
            &["idempotency_keys"],
            self.upkeep_interval,
            shutdown.clone(),
        ));
        tasks.spawn(crate::idempotency::expiry_loop(
            self.pool.clone(),
            self.idempotency_key_ttl,
            self.metrics.idempotency_keys_expired.clone(),
            shutdown.clone(),
        ));
        tracing::info!(addr = %self.local_addr, "listening");
        let grace = self.http.body_timeout + self.request_timeout + Duration::from_secs(5);
        let served = serve(self.listener, self.router, self.http, self.server_metrics, shutdown, grace)
            .await
            .map_err(StartError::Serve);
        // Every request is done; release connections, but never hang on an unresponsive server.
        drop(self.notifier);
        drain(&tasks, TASKS_GRACE).await;
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
