//! Binding, the router, and running until shutdown ([`service_kit::runner`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::middleware;
use axum::Router;
use prometheus_client::registry::Registry;
use service_kit::admin::AdminListener;
use service_kit::connections::Connections;
use service_kit::http::body::{read_within, BodyLimits};
use service_kit::http::server::{serve, ServerMetrics};
use service_kit::http::HttpSettings;
use service_kit::runner::{drain, TaskTracker, TASKS_GRACE};
use service_kit::{Authenticator, Liveness, Readiness, Service, Shutdown, StartError};
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
use service_kit::tenancy::{self, Tenancy};

/// Connections besides the API's: migrations, readiness checks and the upkeep of
/// `idempotency_keys` (a vacuum may hold one for a while). (The outbox notifier keeps one more
/// of its own, and key expiry one as its role.)
const SPARE_CONNECTIONS: u32 = 3;

/// The tables row-level security keeps tenants apart in.
const TENANT_TABLES: &[&str] = &["orders", "idempotency_keys", "outbox", "outbox_published"];

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub orders: Orders,
    pub metrics: Metrics,
    /// Set once the orders schema is migrated; API requests get 503 until then.
    pub migrated: Arc<AtomicBool>,
    pub request_timeout: Duration,
}

/// The whole router: the order API, `/healthz`, `/readyz`, `/metrics` (unless the admin
/// listener serves it), and problem+json for unknown routes and methods. Every request's body
/// is read within the body timeout first.
pub fn router(
    state: AppState,
    readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
    http: &HttpSettings,
    auth: &Authenticator,
    admin: &AdminListener,
) -> Router {
    let api = routes::api(auth).route_layer(middleware::from_fn_with_state(state.clone(), observe::guard_api));
    let body_limits = BodyLimits { timeout: http.body_timeout, max_bytes: MAX_BODY_BYTES };
    Router::new()
        .merge(api)
        .merge(admin.service_routes(readiness, Liveness::new(), registry))
        .merge(service_kit::openapi::route(&crate::openapi::document()))
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
    admin: AdminListener,
    /// What the admin listener reports.
    readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
    pool: PgPool,
    /// The owner's connection for migrations and vacuuming: `pool` unless
    /// `DATABASE_MIGRATION_URL` is set.
    migration_pool: PgPool,
    /// Key expiry's connection, as `DATABASE_KEY_EXPIRY_ROLE`.
    expiry_pool: PgPool,
    db: Connections,
    migrated: Arc<AtomicBool>,
    /// Why the API cannot serve although the schema is migrated (the runtime role is unfit).
    unfit: Arc<OnceLock<String>>,
    tenancy: Tenancy,
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
        let auth = Authenticator::from_settings(&config.auth).map_err(|e| StartError::Config(e.to_string()))?;
        let options = config.database_url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
        let options = config.session_limits().apply(options, Self::NAME);
        let pool = service_kit::startup::lazy_pool_with(options.clone(), SPARE_CONNECTIONS);
        let migration_pool = match &config.database_migration_url {
            None => pool.clone(),
            Some(url) => {
                let options = url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
                service_kit::startup::lazy_pool_with(config.session_limits().apply(options, Self::NAME), 1)
            }
        };
        let expiry_pool =
            service_kit::startup::lazy_pool_with(config.database_key_expiry_role.session_role(options.clone()), 1);
        let tenancy = Tenancy::new(config.database_runtime_role.clone());
        let db = Connections::new(
            pool.connect_options().as_ref().clone(),
            config.database_max_connections,
            Duration::from_secs(5),
        );

        let migrated = Arc::new(AtomicBool::new(false));
        let unfit = Arc::new(OnceLock::<String>::new());
        let notifier_stop = Shutdown::new();
        let notifier = outbox::Notifier::spawn(pool.clone(), notifier_stop.clone().cancelled_owned());

        let registry = Arc::new(Mutex::new(Registry::default()));
        let metrics = Metrics::register(&registry);
        let server_metrics = ServerMetrics::register(&mut registry.lock().unwrap_or_else(|e| e.into_inner()));
        let (schema, role) = (migrated.clone(), unfit.clone());
        let readiness = Readiness::new().postgres(pool.clone()).check("migrations", move || {
            let checked = match role.get() {
                Some(why) => Err(why.clone()),
                None if schema.load(Ordering::Acquire) => Ok(()),
                None => Err("not applied yet".to_owned()),
            };
            async move { checked }
        });
        let readiness = service_kit::auth::announce(&auth, readiness);
        let state = AppState {
            orders: Orders::new(db.clone(), tenancy.clone(), notifier, config.idempotency_key_ttl),
            metrics: metrics.clone(),
            migrated: migrated.clone(),
            request_timeout: config.request_timeout(),
        };
        let admin = AdminListener::bind(config.admin_addr, config.http_addr)?;
        let router = router(state, readiness.clone(), registry.clone(), &config.http, &auth, &admin);
        Ok(Self {
            listener,
            local_addr,
            router,
            admin,
            readiness,
            registry,
            pool,
            migration_pool,
            expiry_pool,
            db,
            migrated,
            unfit,
            tenancy,
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

    /// Where `/metrics` is served apart (`None`: on the API's listener).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr()
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
        tasks.spawn(migrate(
            Migration {
                owner: self.migration_pool.clone(),
                service: self.pool.clone(),
                expiry: self.expiry_pool.clone(),
                tenancy: self.tenancy.clone(),
                migrated: self.migrated.clone(),
                unfit: self.unfit.clone(),
            },
            shutdown.clone(),
        ));
        tasks.spawn(service_kit::upkeep::upkeep_loop(
            self.migration_pool.clone(),
            &["idempotency_keys"],
            self.upkeep_interval,
            shutdown.clone(),
        ));
        tasks.spawn(crate::idempotency::expiry_loop(
            self.expiry_pool.clone(),
            self.idempotency_key_ttl,
            self.metrics.idempotency_keys_expired.clone(),
            shutdown.clone(),
        ));
        tracing::info!(addr = %self.local_addr, "listening");
        let admin_server = self.admin.spawn(
            self.readiness,
            Liveness::new(),
            self.registry,
            self.server_metrics.clone(),
            shutdown.clone(),
        );
        let grace = self.http.body_timeout + self.request_timeout + Duration::from_secs(5);
        let served = serve(self.listener, self.router, self.http, self.server_metrics, shutdown, grace)
            .await
            .map_err(StartError::Serve);
        admin_server.stopped().await;
        // Every request is done; release connections, but never hang on an unresponsive server.
        drop(self.notifier);
        drain(&tasks, TASKS_GRACE).await;
        let closed = async {
            tokio::join!(self.db.close(), self.pool.close(), self.migration_pool.close(), self.expiry_pool.close())
        };
        if tokio::time::timeout(Duration::from_secs(5), closed).await.is_err() {
            tracing::warn!("closing database connections timed out");
        }
        tracing::info!("stopped");
        served
    }
}

/// The start-up migration and what it opens the API to.
struct Migration {
    /// The tables' owner.
    owner: PgPool,
    /// The service's own connection, which switches to the runtime role.
    service: PgPool,
    /// Key expiry's connection, as its own role.
    expiry: PgPool,
    tenancy: Tenancy,
    migrated: Arc<AtomicBool>,
    unfit: Arc<OnceLock<String>>,
}

/// Applies the migrations as the owner, then checks that row-level security holds the runtime
/// role and lets key expiry's role see every tenant's keys; only then does the API serve. An
/// unfit role leaves the service not ready, saying why.
async fn migrate(m: Migration, shutdown: Shutdown) {
    if service_kit::startup::migrate_with_retry(&m.owner, &outbox::MIGRATOR, &shutdown).await.is_none() {
        return;
    }
    tracing::info!("orders database migrated");
    let role = m.tenancy.role();
    let stays_closed = "the API stays closed";
    if !tenancy::verify_runtime_role(&m.service, role, TENANT_TABLES, stays_closed, &m.unfit, &shutdown).await {
        return;
    }
    // Key expiry removes every tenant's expired keys: as a role that row-level security holds
    // to one tenant it would remove none, and the table would grow without bound.
    if tenancy::verify_cross_tenant(&m.expiry, OrderService::NAME, &["idempotency_keys"], &m.unfit, &shutdown).await {
        m.migrated.store(true, Ordering::Release);
    }
}

/// `order-service migrate`: applies the migrations on `DATABASE_MIGRATION_URL` (or
/// `DATABASE_URL`) and returns.
pub async fn migrate_once(config: &Config) -> Result<(), StartError> {
    let url = config.database_migration_url.as_deref().unwrap_or(&config.database_url);
    let options = url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
    let pool = service_kit::startup::lazy_pool_with(options, 1);
    let applied = outbox::MIGRATOR.run(&pool).await.map_err(|e| StartError::Config(format!("migrations: {e}")));
    pool.close().await;
    applied
}
