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
pub mod http;
pub mod metrics;
pub mod replay;
pub mod rows;
pub mod rules;
pub mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use service_kit::connections::Connections;
use service_kit::{ops_router, Readiness};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

pub use config::{Cli, Command, Config, DeadLetterCommand};
pub use service_kit::Shutdown;

/// The inventory database schema.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/inventory");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid DATABASE_URL: {0}")]
    DatabaseUrl(sqlx::Error),
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(redis::RedisError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Consumer(#[from] consumer::ConsumerError),
    #[error("http server: {0}")]
    Serve(std::io::Error),
}

/// A consumer with its HTTP listener bound (so the address is known before it runs).
pub struct Service {
    config: Config,
    pool: PgPool,
    redis: redis::Client,
    listener: tokio::net::TcpListener,
    registry: Arc<Mutex<Registry>>,
}

/// Connections the consumer loop applies batches on, besides the pool (HTTP API, readiness,
/// migrations, upkeep): the loop applies one batch at a time.
const APPLY_CONNECTIONS: u32 = 1;

/// The tables every applied event writes ([`service_kit::upkeep`]).
pub const UPKEEP_TABLES: &[&str] =
    &["processed_messages", "aggregate_checkpoints", "order_reservations", "inventory", "parked_events"];

impl Service {
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let pool = service_kit::startup::lazy_pool(&config.database_url, config.database_max_connections)
            .map_err(StartError::DatabaseUrl)?;
        let redis = redis::Client::open(config.redis_url.as_str()).map_err(StartError::RedisUrl)?;
        let listener =
            tokio::net::TcpListener::bind(config.http_addr).await.map_err(|e| StartError::Bind(config.http_addr, e))?;
        Ok(Self { config, pool, redis, listener, registry: Arc::new(Mutex::new(Registry::default())) })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves HTTP at once (readyz says 503 until Postgres and Redis answer), applies the
    /// migrations when Postgres is reachable, then consumes until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let metrics = metrics::Metrics::register(&self.registry);
        let migrated = Arc::new(AtomicBool::new(false));
        let readiness = Readiness::new()
            .postgres(self.pool.clone())
            .check("redis", {
                let client = self.redis.clone();
                move || redis_ping(client.clone())
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
        let app = http::router(self.pool.clone()).merge(ops_router(readiness, self.registry.clone()));
        // The server stops after the consumer, so in-flight work is visible to the end.
        let stop_http = Shutdown::new();
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(stop_http.clone().cancelled_owned());
        let server = tokio::spawn(std::future::IntoFuture::into_future(serve));
        let consumed = match service_kit::startup::migrate_with_retry(&self.pool, &MIGRATOR, &shutdown).await {
            None => Ok(()),
            Some(()) => {
                migrated.store(true, Ordering::Relaxed);
                let upkeep = tokio::spawn(service_kit::upkeep::upkeep_loop(
                    self.pool.clone(),
                    UPKEEP_TABLES,
                    self.config.upkeep_interval,
                    shutdown.clone(),
                ));
                let db = Connections::new(
                    self.pool.connect_options().as_ref().clone(),
                    APPLY_CONNECTIONS,
                    Duration::from_secs(5),
                );
                let consumer = consumer::Consumer {
                    config: self.config,
                    db: db.clone(),
                    redis: self.redis,
                    metrics,
                    shutdown: shutdown.clone(),
                };
                // On the runtime's workers, next to the I/O driver: awaited here, on the thread
                // that blocks on `main`, every reply would need a wake-up across threads.
                let consumed = match tokio::spawn(consumer.run()).await {
                    Ok(consumed) => consumed,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                db.close().await;
                // The consumer stops on shutdown or on its crash hook; upkeep goes with it.
                upkeep.abort();
                let _ = upkeep.await;
                consumed
            }
        };
        stop_http.cancel();
        let served = match server.await {
            Ok(r) => r.map_err(StartError::Serve),
            Err(e) => Err(StartError::Serve(std::io::Error::other(e))),
        };
        self.pool.close().await;
        consumed?;
        served
    }
}

/// Binds, then runs until `shutdown` (see [`Service::run`]).
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    let service = Service::bind(config).await?;
    if let Some(addr) = service.local_addr() {
        tracing::info!(%addr, "listening");
    }
    service.run(shutdown).await
}

async fn redis_ping(client: redis::Client) -> Result<(), String> {
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}
