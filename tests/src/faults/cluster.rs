//! The system under attack: a private Postgres and broker (Redis, or nats-server with
//! JetStream), the order-service, relays and consumers, all real processes on free ports.

use std::path::PathBuf;
use std::time::Duration;

use ::broker::jetstream::Layout;
use ::broker::Kind;
use broker::redis::target::RedisTarget;
use sqlx::PgPool;
use test_support::{fresh_database_on, PrivateNats, PrivatePostgres, PrivateRedis, PrivateRedisCluster};

use super::drain::{metrics_text, sample, Backlog, RedeliverySampler};
use super::link::Link;
use super::process::{binary, Service};
use super::stream::Probe;
use super::{plan, FaultError};

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub relays: usize,
    pub consumers: usize,
    /// The broker the events go through (`BROKER` of the relays and consumers).
    pub broker: Kind,
    /// AOF with `appendfsync always`; without it Redis is a cache that forgets on a crash.
    /// (nats-server always keeps JetStream on file storage.)
    pub redis_persistent: bool,
    /// Settings of the services; `None` leaves a service's own default (the shipped one).
    pub relay_lease: Option<Duration>,
    pub relay_max_attempts: Option<u32>,
    pub relay_backoff_base: Option<Duration>,
    pub claim_min_idle: Option<Duration>,
    pub max_deliveries: Option<u32>,
    /// Retentions (`REDIS_STREAM_RETENTION` of the relays, `IDEMPOTENCY_KEY_TTL` of the
    /// order-service, `DEDUPE_RETENTION` of the consumers).
    pub stream_retention: Option<Duration>,
    pub idempotency_key_ttl: Option<Duration>,
    pub dedupe_retention: Option<Duration>,
    /// A Redis Cluster of 3 primaries, each with a replica, instead of one Redis.
    pub redis_cluster: bool,
    /// `STREAM_PARTITIONS` of the relays and consumers.
    pub stream_partitions: u16,
    /// `REDIS_MIN_REPLICAS` of the relays.
    pub redis_min_replicas: Option<u32>,
    /// `RUST_LOG` of the services.
    pub log_filter: String,
}

impl ClusterSpec {
    /// Every setting at its shipped default.
    pub fn shipped() -> Self {
        Self {
            relays: 2,
            consumers: 3,
            broker: Kind::Redis,
            redis_persistent: true,
            relay_lease: None,
            relay_max_attempts: None,
            relay_backoff_base: None,
            claim_min_idle: None,
            max_deliveries: None,
            stream_retention: None,
            idempotency_key_ttl: None,
            dedupe_retention: None,
            redis_cluster: false,
            stream_partitions: 1,
            redis_min_replicas: None,
            log_filter: std::env::var("FAULTS_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        }
    }

    /// Why this set-up cannot be run, if it cannot: a Redis-only feature asked of a run whose
    /// events go through NATS, where it would test nothing.
    pub fn refusal(&self) -> Option<String> {
        if self.broker != Kind::Nats {
            return None;
        }
        let redis_only = [
            (self.redis_cluster, "a Redis Cluster (redis_cluster)"),
            (self.redis_min_replicas.is_some(), "REDIS_MIN_REPLICAS (redis_min_replicas)"),
            (!self.redis_persistent, "Redis without persistence (redis_persistent: false)"),
        ];
        let asked: Vec<&str> = redis_only.iter().filter(|(asked, _)| *asked).map(|(_, what)| *what).collect();
        (!asked.is_empty())
            .then(|| format!("the broker is NATS, but the spec asks for Redis-only {}", asked.join(", ")))
    }
}

impl Default for ClusterSpec {
    /// The shipped defaults, but for two timings kept short so that a run's many kills and
    /// freezes recover in seconds: a 2 s relay lease and a 2 s `CLAIM_MIN_IDLE`. Attempts,
    /// backoff and deliveries are the shipped ones.
    fn default() -> Self {
        Self {
            relay_lease: Some(Duration::from_secs(2)),
            claim_min_idle: Some(Duration::from_secs(2)),
            ..Self::shipped()
        }
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub postgres: PrivatePostgres,
    /// The one Redis (started, and unused, when there is a cluster or the broker is NATS).
    pub redis: PrivateRedis,
    pub redis_cluster: Option<PrivateRedisCluster>,
    /// nats-server (JetStream on file storage), when the broker is NATS.
    pub nats: Option<PrivateNats>,
    /// The link each consumer reaches nats-server through, by consumer index (none on Redis).
    pub links: Vec<Link>,
    pub orders_db: PgPool,
    pub orders_url: String,
    pub inventory_db: PgPool,
    pub inventory_url: String,
    /// `REDIS_STREAM`, and the streams of its partitions (itself alone with one).
    pub stream: String,
    pub streams: Vec<String>,
    pub group: String,
    pub order_service: Service,
    pub relays: Vec<Service>,
    pub consumers: Vec<Service>,
    pub log_dir: PathBuf,
    pub http: reqwest::Client,
}

fn consumer_name(name: &str, incarnation: u32) -> Vec<(String, String)> {
    // A restarted process is a new group member, as with the contract's host-name + pid default.
    vec![("CONSUMER_NAME".to_owned(), format!("{name}-{incarnation}"))]
}

/// How long a cluster's primary may be unreachable before its replica takes over.
pub const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_millis(1500);

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Cluster {
    /// Starts everything and waits until every service is ready.
    pub async fn start(spec: ClusterSpec) -> Result<Self, FaultError> {
        if let Some(refusal) = spec.refusal() {
            return Err(FaultError::Setup(refusal));
        }
        let log_dir = std::env::temp_dir().join(format!("faults-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&log_dir).map_err(|e| FaultError::Setup(format!("log dir: {e}")))?;
        let postgres = tokio::task::spawn_blocking(PrivatePostgres::start)
            .await
            .map_err(|e| FaultError::Setup(format!("postgres: {e}")))?;
        let persistent = spec.redis_persistent;
        let redis = tokio::task::spawn_blocking(move || PrivateRedis::start(persistent))
            .await
            .map_err(|e| FaultError::Setup(format!("redis: {e}")))?;
        let redis_cluster = if spec.redis_cluster {
            let cluster = tokio::task::spawn_blocking(|| PrivateRedisCluster::start(3, 1, CLUSTER_NODE_TIMEOUT)).await;
            Some(cluster.map_err(|e| FaultError::Setup(format!("redis cluster: {e}")))?)
        } else {
            None
        };
        let nats = match spec.broker {
            Kind::Nats => Some(
                tokio::task::spawn_blocking(PrivateNats::start)
                    .await
                    .map_err(|e| FaultError::Setup(format!("nats-server: {e}")))?,
            ),
            Kind::Redis => None,
        };
        let mut links = Vec::new();
        if let Some(nats) = &nats {
            for _ in 0..spec.consumers {
                links.push(Link::open(nats.port).await?);
            }
        }
        let orders = fresh_database_on(&postgres.url(), "orders").await;
        let inventory = fresh_database_on(&postgres.url(), "inventory").await;
        let stream = "orders.events".to_owned();
        let streams = domain::Partitions::new(&stream, spec.stream_partitions)
            .map_err(|e| FaultError::Setup(e.to_string()))?
            .streams()
            .to_vec();
        let group = "inventory".to_owned();
        let common = |db: &str| {
            let mut env = vec![
                ("DATABASE_URL".to_owned(), db.to_owned()),
                ("REDIS_URL".to_owned(), redis.url()),
                ("REDIS_STREAM".to_owned(), stream.clone()),
                ("STREAM_PARTITIONS".to_owned(), spec.stream_partitions.to_string()),
                ("RUST_LOG".to_owned(), spec.log_filter.clone()),
            ];
            if let Some(cluster) = &redis_cluster {
                env.push(("REDIS_CLUSTER_URLS".to_owned(), cluster.urls().join(",")));
            }
            env
        };
        let mut order_env = common(&orders.url);
        if let Some(ttl) = spec.idempotency_key_ttl {
            order_env.push(("IDEMPOTENCY_KEY_TTL".to_owned(), ms(ttl)));
        }
        let order_service =
            Service::new("order-service", binary("order-service")?, order_env, &log_dir, test_support::free_port());
        let mut relays = Vec::new();
        for i in 0..spec.relays {
            let mut env = common(&orders.url);
            if let Some(lease) = spec.relay_lease {
                env.push(("OUTBOX_LEASE".to_owned(), ms(lease)));
            }
            if let Some(base) = spec.relay_backoff_base {
                env.push(("OUTBOX_BACKOFF_BASE".to_owned(), ms(base)));
            }
            if let Some(attempts) = spec.relay_max_attempts {
                env.push(("OUTBOX_MAX_ATTEMPTS".to_owned(), attempts.to_string()));
            }
            if let Some(retention) = spec.stream_retention {
                env.push(("REDIS_STREAM_RETENTION".to_owned(), ms(retention)));
            }
            if let Some(replicas) = spec.redis_min_replicas {
                env.push(("REDIS_MIN_REPLICAS".to_owned(), replicas.to_string()));
            }
            if let Some(nats) = &nats {
                env.push(("BROKER".to_owned(), Kind::Nats.to_string()));
                env.push(("NATS_URL".to_owned(), nats.url()));
            }
            relays.push(Service::new(
                &format!("relay-{i}"),
                binary("relay")?,
                env,
                &log_dir,
                test_support::free_port(),
            ));
        }
        let mut consumers = Vec::new();
        for i in 0..spec.consumers {
            let mut env = common(&inventory.url);
            env.push(("CONSUMER_GROUP".to_owned(), group.clone()));
            if let Some(idle) = spec.claim_min_idle {
                env.push(("CLAIM_MIN_IDLE".to_owned(), ms(idle)));
            }
            if let Some(max) = spec.max_deliveries {
                env.push(("MAX_DELIVERIES".to_owned(), max.to_string()));
            }
            if let Some(retention) = spec.dedupe_retention {
                env.push(("DEDUPE_RETENTION".to_owned(), ms(retention)));
            }
            if let Some(link) = links.get(i) {
                env.push(("BROKER".to_owned(), Kind::Nats.to_string()));
                env.push(("NATS_URL".to_owned(), link.url()));
            }
            let service = Service::new(
                &format!("consumer-{i}"),
                binary("inventory-consumer")?,
                env,
                &log_dir,
                test_support::free_port(),
            );
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
            redis_cluster,
            nats,
            links,
            orders_db: orders.pool,
            orders_url: orders.url,
            inventory_db: inventory.pool,
            inventory_url: inventory.url,
            stream,
            streams,
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

    /// The one Redis (not the cluster).
    pub fn redis_client(&self) -> Result<redis::Client, FaultError> {
        redis::Client::open(self.redis.url()).map_err(|e| FaultError::Setup(format!("redis url: {e}")))
    }

    /// The Redis the services use: the cluster, if there is one.
    pub fn redis_target(&self) -> Result<RedisTarget, FaultError> {
        let seeds = self.redis_cluster.as_ref().map(PrivateRedisCluster::urls).unwrap_or_default();
        RedisTarget::new(&self.redis.url(), &seeds).map_err(|e| FaultError::Setup(format!("redis: {e}")))
    }

    /// Where the suite reads the events: the streams and group on Redis, or on NATS the
    /// JetStream stream, the group's durable consumers and what the consumers' links carried.
    pub fn probe(&self) -> Result<Probe, FaultError> {
        match &self.nats {
            None => Ok(Probe::Redis {
                target: self.redis_target()?,
                streams: self.streams.clone(),
                group: self.group.clone(),
            }),
            Some(nats) => {
                let partitions = domain::Partitions::new(&self.stream, self.spec.stream_partitions)
                    .map_err(|e| FaultError::Setup(e.to_string()))?;
                Ok(Probe::Nats {
                    url: nats.url(),
                    layout: Layout::new(&partitions),
                    group: self.group.clone(),
                    links: self.links.iter().map(Link::deliveries).collect(),
                    ack_wait: self.claim_min_idle(),
                })
            }
        }
    }

    /// The consumers' `CLAIM_MIN_IDLE` (on NATS their group's `AckWait`).
    pub fn claim_min_idle(&self) -> Duration {
        self.spec.claim_min_idle.unwrap_or(Duration::from_secs(30))
    }

    /// `kill -9` of the broker's server: Redis, or nats-server.
    pub fn kill_broker(&mut self) {
        match &mut self.nats {
            Some(nats) => nats.kill(),
            None => self.redis.kill(),
        }
    }

    /// Starts the broker's server again, on the same port and data.
    pub fn restart_broker(&mut self) {
        tokio::task::block_in_place(|| match &mut self.nats {
            Some(nats) => nats.restart(),
            None => self.redis.restart(),
        })
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

    /// The name consumer `index` runs under now (its database sessions' `application_name`).
    pub fn consumer_name(&self, index: usize) -> String {
        format!("{}-{}", self.consumers[index].name, self.consumers[index].incarnation)
    }

    /// Freezes consumer `index` (SIGSTOP) while it is in the middle of a batch transaction that
    /// has locked rows, and leaves it frozen. Returns the pid of the frozen transaction's
    /// server backend.
    ///
    /// Caught, not hoped for: this test's own transaction locks the hot SKUs' stock rows, waits
    /// until the consumer's batch transaction is waiting for one of them (it has its checkpoints
    /// locked by then), freezes the consumer and lets the locks go. The server finishes the
    /// consumer's statement, which takes the stock rows' locks, and the frozen client never
    /// ends its transaction. It then holds a hot SKU's row, which most orders need, so the
    /// others run into it at once; a batch holding only rows no later event needs would be
    /// in nobody's way.
    pub async fn freeze_consumer_mid_transaction(&self, index: usize) -> Result<i32, FaultError> {
        let name = self.consumer_name(index);
        let pg = |e: sqlx::Error| FaultError::Postgres(e.to_string());
        // Waiting for a stock row this test holds (not, say, another replica's checkpoint).
        let waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock' \
                       AND $2 = ANY(pg_blocking_pids(pid))";
        let holding = "SELECT state FROM pg_stat_activity WHERE pid = $1";
        let hot: Vec<String> = (0..plan::HOT_SKUS).map(plan::hot_sku).collect();
        for attempt in 0..100 {
            let mut blocker = self.inventory_db.begin().await.map_err(pg)?;
            sqlx::query("SELECT 1 FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE")
                .bind(&hot)
                .execute(&mut *blocker)
                .await
                .map_err(pg)?;
            let blocker_pid: i32 =
                sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *blocker).await.map_err(pg)?;
            let mut caught = None;
            for _ in 0..400 {
                caught = sqlx::query_scalar::<_, i32>(waiting)
                    .bind(&name)
                    .bind(blocker_pid)
                    .fetch_optional(&self.inventory_db)
                    .await
                    .map_err(pg)?;
                if caught.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Some(pid) = caught else {
                blocker.rollback().await.map_err(pg)?;
                continue;
            };
            self.consumers[index].signal("STOP")?;
            blocker.rollback().await.map_err(pg)?;
            // The statement completes on the server (the locks are its), or its lock timeout
            // fired first and the transaction is aborted: then let the consumer go and retry.
            for _ in 0..200 {
                let state: Option<String> =
                    sqlx::query_scalar(holding).bind(pid).fetch_optional(&self.inventory_db).await.map_err(pg)?;
                match state.as_deref() {
                    Some("idle in transaction") => {
                        eprintln!("{name} frozen mid-transaction (backend {pid}) after {attempt} tries");
                        return Ok(pid);
                    }
                    Some("active") => tokio::time::sleep(Duration::from_millis(5)).await,
                    _ => break,
                }
            }
            self.consumers[index].signal("CONT")?;
        }
        Err(FaultError::Setup(format!("{name} was never caught inside a transaction")))
    }

    /// `relay replay --since <since>` against this cluster: retained events published again.
    pub async fn relay_replay(&self, since: &str) -> Result<(), FaultError> {
        let status = tokio::process::Command::new(binary("relay")?)
            .args(["replay", "--since", since])
            .env("DATABASE_URL", &self.orders_url)
            .env("REDIS_URL", self.redis.url())
            .envs(self.nats.iter().flat_map(|n| [("BROKER", Kind::Nats.to_string()), ("NATS_URL", n.url())]))
            .env("REDIS_STREAM", &self.stream)
            .env("RUST_LOG", "warn")
            .status()
            .await
            .map_err(|e| FaultError::Setup(format!("run relay replay: {e}")))?;
        if !status.success() {
            return Err(FaultError::Setup(format!("relay replay failed: {status}")));
        }
        Ok(())
    }

    /// The sum of an unlabelled counter over the relays' `/metrics` (relays not answering count 0).
    pub async fn relays_counter(&self, name: &str) -> f64 {
        self.metric_sum(self.relays.iter().map(|r| r.http_port), name, "").await
    }

    /// Metric `name` (its label sets that contain `label`) summed over the services on `ports`;
    /// one that does not answer counts 0.
    pub async fn metric_sum(&self, ports: impl IntoIterator<Item = u16>, name: &str, label: &str) -> f64 {
        let mut total = 0.0;
        for port in ports {
            if let Some(text) = metrics_text(&self.http, port, Duration::from_secs(2)).await {
                total += sample(&text, name, label).unwrap_or(0.0);
            }
        }
        total
    }

    /// A sampler of this cluster's redeliveries and of its consumers' counts.
    pub fn sampler(&self) -> Result<RedeliverySampler, FaultError> {
        Ok(RedeliverySampler::start(self.probe()?, self.consumer_ports()))
    }

    /// Waits (at most `timeout`) until nothing is pending anywhere; the last backlog seen.
    pub async fn drain(&self, timeout: Duration) -> Result<Backlog, FaultError> {
        let (left, _) = super::drain::drain(&self.orders_db, &self.inventory_db, &self.probe()?, timeout).await;
        Ok(left)
    }

    /// Removes the log directory (kept when a run fails, for the post-mortem).
    pub fn discard_logs(&self) {
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_on_nats_refuses_what_only_redis_has() {
        let nats = ClusterSpec { broker: Kind::Nats, ..ClusterSpec::default() };
        assert_eq!(nats.refusal(), None);
        let mixed = [
            (ClusterSpec { redis_cluster: true, ..nats.clone() }, "Redis Cluster"),
            (ClusterSpec { redis_min_replicas: Some(1), ..nats.clone() }, "REDIS_MIN_REPLICAS"),
            (ClusterSpec { redis_persistent: false, ..nats.clone() }, "without persistence"),
        ];
        for (spec, named) in mixed {
            let refusal = spec.refusal().expect("refused");
            assert!(refusal.contains("NATS") && refusal.contains(named), "{refusal}");
        }
        let redis = ClusterSpec { redis_cluster: true, redis_min_replicas: Some(1), ..ClusterSpec::default() };
        assert_eq!(redis.refusal(), None);
    }
}
