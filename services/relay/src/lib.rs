//! The relay: moves events from the Postgres outbox to a Redis stream, at least once, in
//! seq order per aggregate, safely with any number of relays.
//!
//! A batch is claimed by a transaction that holds its rows' locks, and that the database ends
//! if it sits idle past the lease ([`outbox::claim`]). The batch is published in one pipeline
//! ([`broker::publish::Publisher`]) and recorded by committing that transaction; failures are
//! recorded after it rolled back, fenced against relays that took over
//! ([`outbox::failures`]). Relays wake on `NOTIFY`, on a fallback poll, and when a backing-off
//! row becomes due ([`wake`]).

pub mod backoff;
pub mod batch;
pub mod broker_health;
pub mod config;
pub mod jetstream;
pub mod metrics;
pub mod pump;
pub mod recovery;
pub mod replay;
pub mod retention;
pub mod stream_trim;
pub mod wake;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use service_kit::admin::AdminListener;
use service_kit::http::server::{serve, ServerMetrics};
use service_kit::runner::{drain, TaskTracker};
use service_kit::{Liveness, Readiness, Service, Shutdown, StartError};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use config::{Cli, Command, Config, DeadCommand, StreamCommand};

/// A relay whose HTTP listener is bound; [`Service::run`] starts the work.
pub struct Relay {
    config: Config,
    /// The relay's work: every session runs as `DATABASE_RUNTIME_ROLE`.
    pool: PgPool,
    /// The tables' owner: migrations and vacuuming.
    owner: PgPool,
    listener: TcpListener,
    addr: SocketAddr,
    admin: AdminListener,
}

/// The pool's connections: the listener, the gauge sampler, retention, stream trimming,
/// recovery (a page of republishing and its lease renewal), readiness, and the follow-up
/// statements of a failed batch; not all at once (migrations and table upkeep use the owner's
/// one connection). Each worker claims on a connection
/// of its own besides ([`outbox::claim::ClaimConnection`]).
const POOL_CONNECTIONS: u32 = 6;

/// How long the ops endpoints' connections get to finish at shutdown.
const HTTP_GRACE: Duration = Duration::from_secs(5);

/// The tables row-level security keeps tenants apart in, which the relay's role must see whole.
const TENANT_TABLES: &[&str] = &["outbox", "outbox_published"];

/// The tables whose rows the relays turn over ([`service_kit::upkeep`]).
pub const UPKEEP_TABLES: &[&str] = &["outbox", "outbox_published"];

impl Relay {
    /// Binds `HTTP_ADDR` (port 0 picks a free port) and prepares a lazy database pool.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let limits = config.session_limits();
        let options = config::connect_options(&config.database_url, &limits).map_err(StartError::DatabaseUrl)?;
        let owner_url = config.database_migration_url.as_deref().unwrap_or(&config.database_url);
        let owner = config::connect_options(owner_url, &limits).map_err(StartError::DatabaseUrl)?;
        let owner = service_kit::startup::lazy_pool_with(owner, 1);
        let pool =
            service_kit::startup::lazy_pool_with(config.database_runtime_role.session_role(options), POOL_CONNECTIONS);
        let listener = service_kit::http::server::bind(config.http_addr)
            .map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let admin = AdminListener::bind(config.admin_addr, config.http_addr)?;
        Ok(Self { config, pool, owner, listener, addr, admin })
    }
}

impl Relay {
    /// Where `/metrics` is served apart (`None`: on the relay's own listener).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr()
    }
}

impl Service for Relay {
    const NAME: &'static str = "relay";

    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves /healthz /readyz (and /metrics on the admin listener), applies migrations (retrying while Postgres is down),
    /// then relays until `shutdown`; the batch in flight is finished first.
    async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let Self { config, pool, owner, listener, addr, admin } = self;
        let redis = config.topology.target(&config.redis_url).map_err(|e| StartError::RedisUrl(e.into()))?;
        let partitions = config.topology.partitions(&config.redis_stream);
        let stream_keys = recovery::StreamKeys::of_partitions(&partitions, redis.is_cluster());
        let nats = config
            .broker
            .nats_client(&client_id())
            .await
            .map_err(|e| StartError::Config(format!("NATS_URL: {e}")))?
            .map(|client| (client, ::broker::jetstream::Layout::new(&partitions)));
        let publisher = || publisher_on(&config, &partitions, &redis, nats.as_ref().map(|(client, _)| client));
        let recovery_publisher = publisher();
        let tails: Vec<broker::redis::tails::Tails> =
            partitions.streams().iter().map(|_| broker::redis::tails::Tails::default()).collect();
        let publishers: Vec<broker::publish::Publisher> =
            (0..config.workers as usize).map(|i| publisher().with_tails(tails.clone(), i)).collect();
        let metrics = metrics::Metrics::default();
        let streams = match &nats {
            Some((_, layout)) => layout.subjects.clone(),
            None => partitions.streams().to_vec(),
        };
        for stream in &streams {
            metrics.stream_length(stream);
        }
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let server_metrics = ServerMetrics::register(&mut registry);
        let broker = broker_health::BrokerHealth::new(metrics.clone());
        let readiness = Readiness::new().postgres(pool.clone()).check(config.broker.broker.as_str(), {
            let broker = broker.clone();
            let redis = redis.clone();
            let nats =
                nats.as_ref().map(|(client, layout)| (::broker::jetstream::context(client.clone()), layout.clone()));
            move || {
                let (redis, nats, outage) = (redis.clone(), nats.clone(), broker.outage());
                async move {
                    match (outage, nats) {
                        (Some((since, error)), _) => {
                            Err(format!("not taking entries for {:.1}s: {error}", since.as_secs_f64()))
                        }
                        (None, Some((js, layout))) => ::broker::jetstream::ping(&js, &layout).await,
                        (None, None) => {
                            broker::redis::ping(&redis, Duration::from_secs(2)).await.map_err(|e| e.to_string())
                        }
                    }
                }
            }
        });
        let unfit = Arc::new(std::sync::OnceLock::<String>::new());
        let readiness = readiness.check("database role", service_kit::tenancy::unfit_check(unfit.clone()));
        let partitions_unfit = Arc::new(std::sync::OnceLock::<String>::new());
        let readiness =
            readiness.check("stream partitions", service_kit::tenancy::unfit_check(partitions_unfit.clone()));
        let liveness = Liveness::new();
        let registry = Arc::new(Mutex::new(registry));
        let openapi = service_kit::openapi::document(
            "relay",
            "Moves outbox rows to the event stream; its own listener serves only the probes.",
            utoipa::openapi::OpenApiBuilder::new().build(),
        );
        let app = admin
            .service_routes::<()>(readiness.clone(), liveness.clone(), registry.clone())
            .merge(service_kit::openapi::route(&openapi));
        tracing::info!(%addr, stream = config.redis_stream, partitions = partitions.count(),
            cluster = redis.is_cluster(), "relay listening");
        if redis.is_cluster() && config.redis_min_replicas == 0 {
            tracing::warn!(
                "REDIS_CLUSTER_URLS without REDIS_MIN_REPLICAS: a failover can lose entries a primary took and had not \
                 copied to its replica, and the cluster client follows the failover without an error the relay \
                 could notice; set REDIS_MIN_REPLICAS=1 (docs/SCALING.md)"
            );
        }
        let admin_server = admin.spawn(readiness, liveness.clone(), registry, server_metrics.clone(), shutdown.clone());
        let server =
            tokio::spawn(serve(listener, app, config.http.clone(), server_metrics, shutdown.clone(), HTTP_GRACE));

        let migrated = service_kit::startup::migrate_with_retry(&owner, &outbox::MIGRATOR, &shutdown).await.is_some();
        let fit = migrated
            && service_kit::tenancy::verify_cross_tenant(&pool, Self::NAME, TENANT_TABLES, &unfit, &shutdown).await
            && match &nats {
                Some((client, layout)) => {
                    let js = ::broker::jetstream::context(client.clone());
                    ::broker::jetstream::agree(&js, layout, None, &partitions_unfit, &shutdown).await
                }
                None => {
                    broker::redis::target::agree_on_partitions(&redis, &partitions, true, &partitions_unfit, &shutdown)
                        .await
                }
            };
        if migrated && !fit {
            // Not ready, saying why, until stopped.
            shutdown.cancelled().await;
        } else if migrated {
            let batch_deadline = batch_deadline(&config);
            let wake = Arc::new(Notify::new());
            // Unnamed, the database is the user's own (Postgres's default).
            let options = pool.connect_options();
            let database = options.get_database().unwrap_or(options.get_username()).to_owned();
            let responder = match &nats {
                Some(_) => wake::Responder::everyone(),
                None => wake::Responder::new(redis.clone(), &database, &config.redis_stream),
            };
            let tasks = TaskTracker::new();
            tasks.spawn(wake::listen(pool.clone(), responder, wake.clone(), shutdown.clone()));
            tasks.spawn(metrics.clone().sample_outbox(pool.clone(), Duration::from_secs(5), shutdown.clone()));
            tasks.spawn(retention::retention_loop(
                pool.clone(),
                config.retention,
                Duration::from_secs(60),
                shutdown.clone(),
            ));
            let recovery_settings = recovery::RecoverySettings {
                partitions: stream_keys.clone(),
                retention: config.retention,
                stream_retention: config.stream_retention,
                batch_size: config.batch_size,
                margin: recovery::MARGIN + batch_deadline,
            };
            if let Some((client, layout)) = &nats {
                let js = ::broker::jetstream::context(client.clone());
                tasks.spawn(jetstream::trim_loop(
                    js.clone(),
                    layout.clone(),
                    pool.clone(),
                    config.stream_retention,
                    metrics.clone(),
                    shutdown.clone(),
                ));
                tasks.spawn(jetstream::recovery_loop(
                    js,
                    layout.clone(),
                    pool.clone(),
                    recovery_publisher,
                    recovery_settings,
                    metrics.clone(),
                    shutdown.clone(),
                ));
            } else {
                tasks.spawn(stream_trim::trim_loop(
                    redis.clone(),
                    pool.clone(),
                    stream_keys.clone(),
                    config.stream_retention,
                    metrics.clone(),
                    shutdown.clone(),
                ));
                tasks.spawn(recovery::recovery_loop(
                    redis.clone(),
                    pool.clone(),
                    recovery_publisher,
                    tails,
                    recovery_settings,
                    metrics.clone(),
                    shutdown.clone(),
                ));
            }
            tasks.spawn(service_kit::upkeep::upkeep_loop(
                owner.clone(),
                UPKEEP_TABLES,
                config.upkeep_interval,
                shutdown.clone(),
            ));
            let pumps = publishers.into_iter().enumerate().map(|(i, publisher)| {
                let settings = batch::Settings::from(&config);
                let worker = batch::Worker::new(pool.clone(), publisher, settings, metrics.clone(), broker.clone());
                let cx = pump::PumpContext {
                    pool: pool.clone(),
                    wake: wake.clone(),
                    poll_interval: config.poll_interval,
                    batch_deadline,
                    heartbeat: liveness.register(format!("relay pump {i}"), stall_after(&config, batch_deadline)),
                    shutdown: shutdown.clone(),
                };
                pump::pump(worker, cx)
            });
            for pump in pumps {
                tasks.spawn(pump);
            }
            shutdown.cancelled().await;
            // Each pump finishes the batch in flight (bounded by its deadline); the other loops
            // stop at once.
            drain(&tasks, batch_deadline + Duration::from_secs(10)).await;
        }
        tokio::join!(pool.close(), owner.close());
        admin_server.stopped().await;
        match server.await {
            Ok(result) => result.map_err(StartError::Serve),
            Err(e) => Err(StartError::Serve(std::io::Error::other(e))),
        }
    }
}

/// This relay among the broker's clients.
fn client_id() -> String {
    format!("relay-{}", service_kit::messaging::instance_name())
}

/// A publisher to `partitions` on the broker `config` names: NATS through `nats` (the relay's
/// one client), else Redis at `redis`.
fn publisher_on(
    config: &Config,
    partitions: &domain::Partitions,
    redis: &broker::redis::target::RedisTarget,
    nats: Option<&::broker::async_nats::Client>,
) -> broker::publish::Publisher {
    match nats {
        Some(client) => {
            let peer = service_kit::messaging::MessagingPeer::nats(&config.broker.nats_url, client_id());
            broker::publish::Publisher::Nats(broker::publish::NatsPublisher::new(client.clone(), partitions, peer))
        }
        None => broker::publish::Publisher::to(redis.clone(), partitions.clone())
            .with_min_replicas(config.redis_min_replicas, config.redis_wait_timeout),
    }
}

/// A publisher to the broker `config` names, for a one-off command (`relay replay`).
pub async fn publisher(config: &Config) -> anyhow::Result<broker::publish::Publisher> {
    use anyhow::Context;
    let partitions = config.topology.partitions(&config.redis_stream);
    let redis = config.topology.target(&config.redis_url).context("REDIS_URL or REDIS_CLUSTER_URLS")?;
    let nats = config.broker.nats_client(&client_id()).await.context("NATS_URL")?;
    Ok(publisher_on(config, &partitions, &redis, nats.as_ref()))
}

/// The longest one batch may take: its claim, publishing (Redis answers within 10 s or the
/// pipeline fails), recording; past it the batch's connection is closed, which ends its claim.
fn batch_deadline(config: &Config) -> Duration {
    config.session_limits().client_deadline(3) + config.lease + Duration::from_secs(10)
}

/// How long a pump may go without finishing a round before `/healthz` calls it stalled: a batch
/// at its deadline, then the longest wait between rounds.
fn stall_after(config: &Config, batch_deadline: Duration) -> Duration {
    (batch_deadline + config.poll_interval.max(Duration::from_secs(5))) * 2
}
