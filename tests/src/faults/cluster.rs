//! The system under attack: a private Postgres and Redis, the order-service, relays and
//! consumers, all real processes on free ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use test_support::{fresh_database_on, PrivatePostgres, PrivateRedis};

use super::process::{binary, Service};
use super::FaultError;

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub relays: usize,
    pub consumers: usize,
    /// AOF with `appendfsync always`; without it Redis is a cache that forgets on a crash.
    pub redis_persistent: bool,
    pub relay_lease: Duration,
    pub claim_min_idle: Duration,
    pub max_deliveries: u32,
    /// `RUST_LOG` of the services.
    pub log_filter: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            relays: 2,
            consumers: 3,
            redis_persistent: true,
            relay_lease: Duration::from_secs(2),
            claim_min_idle: Duration::from_secs(2),
            max_deliveries: 20,
            log_filter: std::env::var("FAULTS_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        }
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub postgres: PrivatePostgres,
    pub redis: PrivateRedis,
    pub orders_db: PgPool,
    pub orders_url: String,
    pub inventory_db: PgPool,
    pub inventory_url: String,
    pub stream: String,
    pub group: String,
    pub order_service: Service,
    pub relays: Vec<Service>,
    pub consumers: Vec<Service>,
    pub log_dir: PathBuf,
    pub http: reqwest::Client,
}

fn free_port() -> Result<u16, FaultError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| FaultError::Setup(format!("free port: {e}")))
}

fn consumer_name(name: &str, incarnation: u32) -> Vec<(String, String)> {
    // A restarted process is a new group member, as with the contract's host-name + pid default.
    vec![("CONSUMER_NAME".to_owned(), format!("{name}-{incarnation}"))]
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Cluster {
    /// Starts everything and waits until every service is ready.
    pub async fn start(spec: ClusterSpec) -> Result<Self, FaultError> {
        let log_dir = std::env::temp_dir().join(format!("faults-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&log_dir).map_err(|e| FaultError::Setup(format!("log dir: {e}")))?;
        let postgres = tokio::task::spawn_blocking(PrivatePostgres::start)
            .await
            .map_err(|e| FaultError::Setup(format!("postgres: {e}")))?;
        let persistent = spec.redis_persistent;
        let redis = tokio::task::spawn_blocking(move || PrivateRedis::start(persistent))
            .await
            .map_err(|e| FaultError::Setup(format!("redis: {e}")))?;
        let orders = fresh_database_on(&postgres.url(), "orders").await;
        let inventory = fresh_database_on(&postgres.url(), "inventory").await;
        let stream = "orders.events".to_owned();
        let group = "inventory".to_owned();
        let common = |db: &str| {
            vec![
                ("DATABASE_URL".to_owned(), db.to_owned()),
                ("REDIS_URL".to_owned(), redis.url()),
                ("REDIS_STREAM".to_owned(), stream.clone()),
                ("RUST_LOG".to_owned(), spec.log_filter.clone()),
            ]
        };
        let order_service =
            Service::new("order-service", binary("order-service")?, common(&orders.url), &log_dir, free_port()?);
        let mut relays = Vec::new();
        for i in 0..spec.relays {
            let mut env = common(&orders.url);
            env.push(("OUTBOX_LEASE".to_owned(), ms(spec.relay_lease)));
            env.push(("OUTBOX_BACKOFF_BASE".to_owned(), "100ms".to_owned()));
            env.push(("OUTBOX_BACKOFF_MAX".to_owned(), "1s".to_owned()));
            env.push(("OUTBOX_MAX_ATTEMPTS".to_owned(), "1000".to_owned()));
            relays.push(Service::new(&format!("relay-{i}"), binary("relay")?, env, &log_dir, free_port()?));
        }
        let mut consumers = Vec::new();
        for i in 0..spec.consumers {
            let mut env = common(&inventory.url);
            env.push(("CONSUMER_GROUP".to_owned(), group.clone()));
            env.push(("CLAIM_MIN_IDLE".to_owned(), ms(spec.claim_min_idle)));
            env.push(("MAX_DELIVERIES".to_owned(), spec.max_deliveries.to_string()));
            let service =
                Service::new(&format!("consumer-{i}"), binary("inventory-consumer")?, env, &log_dir, free_port()?);
            consumers.push(service.with_per_start(consumer_name));
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| FaultError::Setup(format!("http client: {e}")))?;
        let mut cluster = Self {
            spec,
            postgres,
            redis,
            orders_db: orders.pool,
            orders_url: orders.url,
            inventory_db: inventory.pool,
            inventory_url: inventory.url,
            stream,
            group,
            order_service,
            relays,
            consumers,
            log_dir,
            http,
        };
        for s in cluster.services_mut() {
            s.start()?;
        }
        for s in cluster.services() {
            s.wait_ready(&cluster.http, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        std::iter::once(&self.order_service).chain(&self.relays).chain(&self.consumers)
    }

    pub fn services_mut(&mut self) -> impl Iterator<Item = &mut Service> {
        std::iter::once(&mut self.order_service).chain(&mut self.relays).chain(&mut self.consumers)
    }

    pub fn consumer_ports(&self) -> Vec<u16> {
        self.consumers.iter().map(|c| c.http_port).collect()
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.order_service.http_port)
    }

    pub fn redis_client(&self) -> Result<redis::Client, FaultError> {
        redis::Client::open(self.redis.url()).map_err(|e| FaultError::Setup(format!("redis url: {e}")))
    }

    /// Sets initial stock (in the inventory database the consumers migrated).
    ///
    /// Ten thousand SKUs through `PUT /inventory/{sku}` would only slow the run down; the API
    /// path is covered by the consumer's own tests.
    pub async fn seed_stock(&self, stock: &[(String, i64)]) -> Result<(), FaultError> {
        let skus: Vec<&str> = stock.iter().map(|(s, _)| s.as_str()).collect();
        let qty: Vec<i64> = stock.iter().map(|(_, q)| *q).collect();
        for _ in 0..600 {
            let migrated: Option<String> = sqlx::query_scalar("SELECT to_regclass('inventory')::text")
                .fetch_one(&self.inventory_db)
                .await
                .ok()
                .flatten();
            if migrated.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sqlx::query("INSERT INTO inventory (sku, on_hand) SELECT * FROM unnest($1::text[], $2::bigint[])")
            .bind(&skus)
            .bind(&qty)
            .execute(&self.inventory_db)
            .await
            .map_err(|e| FaultError::Setup(format!("seed stock: {e}")))?;
        Ok(())
    }

    /// Stops every service (SIGKILL: the suite only cares about what reached the databases).
    pub async fn stop_services(&mut self) {
        for s in self.services_mut() {
            s.kill().await;
        }
    }

    /// Removes the log directory (kept when a run fails, for the post-mortem).
    pub fn discard_logs(&self) {
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}
