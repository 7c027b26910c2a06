//! inventory-consumer: applies order events from a Redis stream (consumer group) to inventory,
//! exactly once per event and in seq order per order, and serves the stock over HTTP.
//!
//! Guarantees and where they live:
//! - exactly once: an entry's effect, its `processed_messages` row and its order's checkpoint
//!   commit in one transaction ([`apply`]); XACK only after commit ([`consumer`]).
//! - order per order: an event ahead of its order's checkpoint is parked (acknowledged, kept in
//!   `parked_events`) and applied by the transaction that fills the gap. An order whose event
//!   was dead-lettered therefore waits (its later events stay parked) until that dead letter is
//!   re-driven; other orders are unaffected.

pub mod apply;
pub mod config;
pub mod consumer;
pub mod dead_letters;
pub mod entries;
pub mod http;
pub mod metrics;
pub mod replay_demo;
pub mod retention;
pub mod rules;
pub mod settle;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use broker::group::Member;
use broker::redis::target::RedisTarget;
use prometheus_client::registry::Registry;
use service_kit::admin::AdminListener;
use service_kit::connections::Connections;
use service_kit::http::body::{read_within, BodyLimits};
use service_kit::http::server::{serve, ServerMetrics};
use service_kit::runner::{drain, TaskTracker, TASKS_GRACE};
use service_kit::session::RoleName;
use service_kit::tenancy::Tenancy;
use service_kit::{Liveness, Readiness, SessionLimits};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

pub use config::{Cli, Command, Config, DeadLetterCommand};
pub use service_kit::{Service, Shutdown, StartError};

/// The inventory database schema.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/inventory");

/// A consumer with its HTTP listener bound (so the address is known before it runs).
pub struct InventoryConsumer {
    config: Config,
    limits: SessionLimits,
    /// Sessions run as `DATABASE_CONSUMER_ROLE`; the stock API's transactions switch to
    /// `DATABASE_RUNTIME_ROLE`.
    pool: PgPool,
    /// The tables' owner (`DATABASE_MIGRATION_URL`, or `DATABASE_URL` as its own user):
    /// migrations and vacuuming.
    owner: PgPool,
    redis: RedisTarget,
    /// The NATS client when `BROKER=nats`.
    nats: Option<broker::async_nats::Client>,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    admin: AdminListener,
    registry: Arc<Mutex<Registry>>,
    auth: service_kit::Authenticator,
}

/// The most connections the consumer loops apply batches on, besides the pool (HTTP API,
/// readiness, retention) and the owner's (migrations, upkeep): each loop (one per partition
/// stream) applies one batch at a time, and past this many partitions loops take turns.
const MOST_APPLY_CONNECTIONS: usize = 8;

/// The tables every applied event writes ([`service_kit::upkeep`]).
pub const UPKEEP_TABLES: &[&str] =
    &["processed_messages", "aggregate_checkpoints", "order_reservations", "inventory", "parked_events"];

impl InventoryConsumer {
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let limits = config.session_limits().map_err(StartError::Config)?;
        let auth =
            service_kit::Authenticator::from_settings(&config.auth).map_err(|e| StartError::Config(e.to_string()))?;
        let options = config.database_url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
        let options = limits.apply(options, &config.consumer_name);
        let pool = service_kit::startup::lazy_pool_with(
            config.database_consumer_role.session_role(options),
            config.database_max_connections,
        );
        let owner_url = config.database_migration_url.as_deref().unwrap_or(&config.database_url);
        let owner = owner_url.parse::<PgConnectOptions>().map_err(StartError::DatabaseUrl)?;
        let owner = service_kit::startup::lazy_pool_with(limits.apply(owner, &config.consumer_name), 1);
        let redis = config.topology.target(&config.redis_url).map_err(|e| StartError::RedisUrl(e.into()))?;
        let nats = config
            .broker
            .nats_client(&config.consumer_name)
            .await
            .map_err(|e| StartError::Config(format!("NATS_URL: {e}")))?;
        let listener = service_kit::http::server::bind(config.http_addr)
            .map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let admin = AdminListener::bind(config.admin_addr, config.http_addr)?;
        let registry = Arc::new(Mutex::new(Registry::default()));
        Ok(Self { config, limits, pool, owner, redis, nats, listener, local_addr, admin, registry, auth })
    }
}

impl InventoryConsumer {
    /// Where `/metrics` is served apart (`None`: on the API's listener).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr()
    }
}

impl Service for InventoryConsumer {
    const NAME: &'static str = "inventory-consumer";

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves HTTP at once (readyz says 503 until Postgres and Redis answer), applies the
    /// migrations when Postgres is reachable, then consumes until `shutdown`.
    async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let metrics = metrics::Metrics::register(&self.registry);
        let server_metrics = ServerMetrics::register(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
        let liveness = Liveness::new();
        let migrated = Arc::new(AtomicBool::new(false));
        let readiness = Readiness::new()
            .postgres(self.pool.clone())
            .check(self.config.broker.broker.as_str(), {
                let target = self.redis.clone();
                let nats = self.nats.clone().map(broker::jetstream::context);
                let layout =
                    broker::jetstream::Layout::new(&self.config.topology.partitions(&self.config.redis_stream));
                move || {
                    let (target, nats, layout) = (target.clone(), nats.clone(), layout.clone());
                    async move {
                        match nats {
                            Some(js) => broker::jetstream::ping(&js, &layout).await,
                            None => {
                                broker::redis::ping(&target, Duration::from_secs(1)).await.map_err(|e| e.to_string())
                            }
                        }
                    }
                }
            })
            .check("migrations", {
                let migrated = migrated.clone();
                move || {
                    let done = migrated.load(Ordering::Relaxed);
                    async move {
                        if done {
                            Ok(())
                        } else {
                            Err("not applied yet".to_owned())
                        }
                    }
                }
            });
        let unfit = Arc::new(OnceLock::<String>::new());
        let readiness = readiness.check("runtime role", service_kit::tenancy::unfit_check(unfit.clone()));
        let loop_unfit = Arc::new(OnceLock::<String>::new());
        let readiness = readiness.check("database role", service_kit::tenancy::unfit_check(loop_unfit.clone()));
        let partitions_unfit = Arc::new(OnceLock::<String>::new());
        let readiness =
            readiness.check("stream partitions", service_kit::tenancy::unfit_check(partitions_unfit.clone()));
        let partitions = self.config.topology.partitions(&self.config.redis_stream);
        let readiness = service_kit::auth::announce(&self.auth, readiness);
        let body_limits = BodyLimits { timeout: self.config.http.body_timeout, max_bytes: http::MAX_BODY };
        let stock_api = http::StockApi {
            pool: self.pool.clone(),
            tenancy: Tenancy::new(self.config.database_runtime_role.clone()),
            unfit: unfit.clone(),
        };
        let app = http::router(stock_api, &self.auth)
            .merge(self.admin.service_routes(readiness.clone(), liveness.clone(), self.registry.clone()))
            .merge(service_kit::openapi::route(&http::openapi()))
            .layer(axum::middleware::from_fn_with_state(body_limits, read_within));
        // The server stops after the consumer, so in-flight work is visible to the end.
        let stop_http = Shutdown::new();
        let grace = self.config.http.body_timeout + Duration::from_secs(5);
        let admin_server = self.admin.spawn(
            readiness,
            liveness.clone(),
            self.registry.clone(),
            server_metrics.clone(),
            stop_http.clone(),
        );
        let server =
            tokio::spawn(serve(self.listener, app, self.config.http.clone(), server_metrics, stop_http.clone(), grace));
        // Nothing is consumed unless the migrations were applied (None: shut down first).
        let applied = service_kit::startup::migrate_with_retry(&self.owner, &MIGRATOR, &shutdown).await.is_some();
        if applied {
            migrated.store(true, Ordering::Relaxed);
            check_runtime_role(&self.pool, &self.config.database_runtime_role, &unfit).await;
        }
        // The loop applies every tenant's events: on a role row-level security holds, it would
        // find no stock and reject every order. Not ready, saying why, until stopped.
        let fit = applied
            && service_kit::tenancy::verify_cross_tenant(&self.pool, Self::NAME, TENANT_TABLES, &loop_unfit, &shutdown)
                .await
            && match &self.nats {
                Some(client) => {
                    let js = broker::jetstream::context(client.clone());
                    let layout = broker::jetstream::Layout::new(&partitions);
                    let dlq = Some(self.config.dlq_max_len);
                    broker::jetstream::agree(&js, &layout, dlq, &partitions_unfit, &shutdown).await
                }
                None => {
                    broker::redis::target::agree_on_partitions(
                        &self.redis,
                        &partitions,
                        true,
                        &partitions_unfit,
                        &shutdown,
                    )
                    .await
                }
            };
        if applied && !fit {
            shutdown.cancelled().await;
        } else if applied {
            // Background work stops with the consumer.
            let stop_tasks = shutdown.child_token();
            let tasks = TaskTracker::new();
            tasks.spawn(service_kit::upkeep::upkeep_loop(
                self.owner.clone(),
                UPKEEP_TABLES,
                self.config.upkeep_interval,
                stop_tasks.clone(),
            ));
            tasks.spawn(retention::prune_loop(
                self.pool.clone(),
                retention::RetentionSettings {
                    dedupe: self.config.dedupe_retention,
                    dead_letters: self.config.dead_letter_retention,
                    parked_warn_after: self.config.parked_warn_after,
                },
                metrics.clone(),
                stop_tasks.clone(),
            ));
            let apply_deadline = self.limits.client_deadline(APPLY_STATEMENTS);
            // A loop waiting for its turn waits for another's batch, at most its deadline.
            let db = Connections::new(
                self.pool.connect_options().as_ref().clone(),
                u32::try_from(partitions.count().min(MOST_APPLY_CONNECTIONS)).unwrap_or(1),
                apply_deadline + Duration::from_secs(5),
            );
            let peer = match &self.nats {
                Some(_) => service_kit::messaging::MessagingPeer::nats(
                    &self.config.broker.nats_url,
                    self.config.consumer_name.clone(),
                ),
                None => broker::redis::peer(&self.redis, self.config.consumer_name.clone()),
            };
            let layout = broker::jetstream::Layout::new(&partitions);
            // One loop per partition stream (or subject), each a member of the group on it.
            let mut loops = tokio::task::JoinSet::new();
            for (index, stream) in partitions.streams().iter().enumerate() {
                let stream = match &self.nats {
                    Some(_) => &layout.subjects[index],
                    None => stream,
                };
                metrics.pending_entries(stream);
                let name = match partitions.count() {
                    1 => "consumer loop".to_owned(),
                    _ => format!("consumer loop {stream}"),
                };
                let settings = broker::group::MemberSettings {
                    group: self.config.consumer_group.clone(),
                    consumer: self.config.consumer_name.clone(),
                    batch_size: self.config.batch_size,
                    block: self.config.block,
                    claim_min_idle: self.config.claim_min_idle,
                    departed_after: self.config.departed_after,
                    dlq_max_len: self.config.dlq_max_len,
                };
                let member = match &self.nats {
                    Some(client) => Member::Nats(Box::new(broker::jetstream::member::Member::new(
                        client.clone(),
                        layout.clone(),
                        index,
                        settings,
                    ))),
                    // `<stream>.dlq`, as the contract names it: only ever written on its own,
                    // so it needs no slot of its stream's (a partition's shares it anyway).
                    None => Member::Redis(Box::new(broker::redis::member::Member::new(
                        self.redis.clone(),
                        stream.clone(),
                        format!("{stream}.dlq"),
                        settings,
                    ))),
                };
                let consumer = consumer::Consumer {
                    config: self.config.clone(),
                    stream: stream.clone(),
                    peer: peer.clone(),
                    db: db.clone(),
                    metrics: metrics.clone(),
                    shutdown: shutdown.clone(),
                    heartbeat: liveness.register(name, stall_after(&self.config, apply_deadline)),
                    apply_deadline,
                };
                // On the runtime's workers, next to the I/O driver: run on the thread that
                // blocks on `main`, every reply would need a wake-up across threads.
                loops.spawn(consumer.run(member));
            }
            // Each stops at shutdown; one that panics takes the process down at once, as the
            // one loop did before there were partitions.
            while let Some(stopped) = loops.join_next().await {
                if let Err(e) = stopped {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
            db.close().await;
            stop_tasks.cancel();
            drain(&tasks, TASKS_GRACE).await;
        }
        stop_http.cancel();
        admin_server.stopped().await;
        let served = match server.await {
            Ok(r) => r.map_err(StartError::Serve),
            Err(e) => Err(StartError::Serve(std::io::Error::other(e))),
        };
        tokio::join!(self.pool.close(), self.owner.close());
        served
    }
}

/// The tables row-level security keeps tenants apart in.
const TENANT_TABLES: &[&str] = &["inventory", "order_reservations"];

/// Checks that row-level security holds the stock API's runtime role; if not, `unfit` says
/// why (the API refuses and `/readyz` reports it). A check that cannot run is only logged:
/// the role stays presumed fit, as the policies still apply to whoever it is.
async fn check_runtime_role(pool: &PgPool, role: &RoleName, unfit: &OnceLock<String>) {
    let checked = async { service_kit::tenancy::check_role(&mut *pool.acquire().await?, role, TENANT_TABLES).await };
    match checked.await {
        Ok(None) => {}
        Ok(Some(why)) => {
            tracing::error!(%role, "{why}; the stock API stays closed");
            let _ = unfit.set(why);
        }
        Err(e) => tracing::warn!(error = %e, %role, "checking the runtime role failed"),
    }
}

/// Statements of one batch's transaction (begin, checkpoints, stock, write, commit, and two
/// dead-letter inserts: undecodable and expired entries): bounds how long the loop waits for
/// Postgres before it gives up the connection.
const APPLY_STATEMENTS: u32 = 7;

/// How long the loop may go round without beating before `/healthz` calls it stalled: each of
/// its waits is bounded (a read by `BLOCK` plus Redis's answer, a batch by the apply deadline,
/// and a batch applied entry by entry beats per entry), so only a hang gets this far.
fn stall_after(config: &Config, apply_deadline: Duration) -> Duration {
    let redis_round = config.block + Duration::from_secs(10);
    (redis_round * 4 + apply_deadline * 2).max(Duration::from_secs(60))
}
