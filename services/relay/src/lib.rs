//! The relay: moves events from the Postgres outbox to a Redis stream, at least once, in
//! seq order per aggregate, safely with any number of relays.
//!
//! A batch is claimed by a transaction that holds its rows' locks, and that the database ends
//! if it sits idle past the lease ([`claim`]). The batch is published in one pipeline
//! ([`publish::Publisher`]) and recorded by committing that transaction; failures are
//! recorded after it rolled back, fenced against relays that took over ([`finish`]). Relays
//! wake on `NOTIFY`, on a fallback poll, and when a backing-off row becomes due ([`wake`]).

pub mod backoff;
pub mod batch;
pub mod claim;
pub mod config;
pub mod dead;
pub mod finish;
pub mod metrics;
pub mod publish;
pub mod pump;
pub mod replay;
pub mod retention;
pub mod row;
pub mod wake;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use service_kit::{ops_router, Readiness, Shutdown};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use config::{Cli, Command, Config, DeadCommand};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid DATABASE_URL: {0}")]
    DatabaseUrl(sqlx::Error),
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(redis::RedisError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// A relay whose HTTP listener is bound; [`Relay::run`] starts the work.
pub struct Relay {
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    addr: SocketAddr,
}

/// The pool's connections: the listener, the gauge sampler, retention, table upkeep, readiness,
/// and the follow-up statements of a failed batch. Each worker claims on a connection of its
/// own besides ([`claim::ClaimConnection`]).
const POOL_CONNECTIONS: u32 = 6;

/// The tables whose rows the relays turn over ([`service_kit::upkeep`]).
pub const UPKEEP_TABLES: &[&str] = &["outbox", "outbox_published"];

impl Relay {
    /// Binds `HTTP_ADDR` (port 0 picks a free port) and prepares a lazy database pool.
    pub async fn bind(config: Config) -> Result<Self, RelayError> {
        let options = claim::connect_options(&config.database_url, config.lease).map_err(RelayError::DatabaseUrl)?;
        let pool = service_kit::startup::lazy_pool_with(options, POOL_CONNECTIONS);
        let listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| RelayError::Bind { addr: config.http_addr, source })?;
        let addr = listener.local_addr().map_err(|source| RelayError::Bind { addr: config.http_addr, source })?;
        Ok(Self { config, pool, listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves /healthz /readyz /metrics, applies migrations (retrying while Postgres is down),
    /// then relays until `shutdown`; the batch in flight is finished first.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RelayError> {
        let Self { config, pool, listener, addr } = self;
        let redis = redis::Client::open(config.redis_url.as_str()).map_err(RelayError::RedisUrl)?;
        let responder_client = redis.clone();
        let publishers = (0..config.workers)
            .map(|_| publish::Publisher::new(&config.redis_url, config.redis_stream.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RelayError::RedisUrl)?;
        let metrics = metrics::Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let readiness = Readiness::new().postgres(pool.clone()).check("redis", move || {
            let redis = redis.clone();
            async move { publish::Publisher::ping(&redis).await.map_err(|e| e.to_string()) }
        });
        let app = ops_router::<()>(readiness, Arc::new(Mutex::new(registry)));
        tracing::info!(%addr, stream = config.redis_stream, "relay listening");
        let http_shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { http_shutdown.cancelled().await }).await
        });

        if service_kit::startup::migrate_with_retry(&pool, &outbox::MIGRATOR, &shutdown).await.is_some() {
            let wake = Arc::new(Notify::new());
            // Unnamed, the database is the user's own (Postgres's default).
            let options = pool.connect_options();
            let database = options.get_database().unwrap_or(options.get_username()).to_owned();
            let responder = wake::Responder::new(responder_client, &database, &config.redis_stream);
            let tasks = [
                tokio::spawn(wake::listen(pool.clone(), responder, wake.clone(), shutdown.clone())),
                tokio::spawn(metrics.clone().sample_outbox(pool.clone(), Duration::from_secs(5), shutdown.clone())),
                tokio::spawn(retention::retention_loop(
                    pool.clone(),
                    config.retention,
                    Duration::from_secs(60),
                    shutdown.clone(),
                )),
                tokio::spawn(service_kit::upkeep::upkeep_loop(
                    pool.clone(),
                    UPKEEP_TABLES,
                    config.upkeep_interval,
                    shutdown.clone(),
                )),
            ];
            let pumps = publishers.into_iter().map(|publisher| {
                let worker =
                    batch::Worker::new(pool.clone(), publisher, batch::Settings::from(&config), metrics.clone());
                tokio::spawn(pump::pump(worker, pool.clone(), wake.clone(), config.poll_interval, shutdown.clone()))
            });
            for pump in pumps.collect::<Vec<_>>() {
                let _ = pump.await;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
        pool.close().await;
        match server.await {
            Ok(result) => result.map_err(RelayError::Serve),
            Err(e) => Err(RelayError::Serve(std::io::Error::other(e))),
        }
    }
}

/// Binds, prints the address, and runs until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RelayError> {
    let relay = Relay::bind(config).await?;
    println!("relay listening on {}", relay.local_addr());
    relay.run(shutdown).await
}
