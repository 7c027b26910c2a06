//! Where a service's Redis is, one node (`REDIS_URL`) or a Redis Cluster
//! (`REDIS_CLUSTER_URLS`), and a connection to either that commands run on alike.
//!
//! On a cluster, the connection routes each command to the shard holding its key, follows
//! `MOVED` and `ASK`, and refreshes its view of the slots when the shards change (a failover,
//! a resharding). A pipeline or a script must keep to one slot: the keys this system uses
//! together are named to share one ([`domain::partition::companion_key`]).

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value,
};

/// One Redis node, or the seed nodes of a cluster.
#[derive(Clone)]
pub enum RedisTarget {
    Node(Client),
    Cluster { client: ClusterClient, seeds: Vec<ConnectionInfo> },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URLs: they may carry passwords.
        f.write_str(if self.is_cluster() { "RedisTarget::Cluster" } else { "RedisTarget::Node" })
    }
}

/// How long a connection may take to open, and a command to be answered.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Timeouts {
    pub const fn new(connect: Duration, response: Duration) -> Self {
        Self { connect, response }
    }
}

impl RedisTarget {
    /// The cluster of `cluster_urls` (seed nodes) when there are any, else the node `url`.
    pub fn new(url: &str, cluster_urls: &[String]) -> RedisResult<Self> {
        if cluster_urls.is_empty() {
            return Ok(Self::Node(Client::open(url)?));
        }
        let seeds = cluster_urls.iter().map(|u| u.as_str().into_connection_info()).collect::<RedisResult<Vec<_>>>()?;
        Ok(Self::Cluster { client: ClusterClient::builder(seeds.clone()).build()?, seeds })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// A new connection: multiplexed over one socket on a node; one per shard on a cluster.
    pub async fn connect(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match self {
            Self::Node(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response);
                Ok(RedisConn::Node(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            Self::Cluster { client, .. } => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response);
                Ok(RedisConn::Cluster(client.get_async_connection_with_config(config).await?))
            }
        }
    }

    /// The node this service names as its broker (`server.address`, `server.port`): the node
    /// itself, or a cluster's first seed.
    pub fn first_node(&self) -> Option<&ConnectionInfo> {
        match self {
            Self::Node(client) => Some(client.get_connection_info()),
            Self::Cluster { seeds, .. } => seeds.first(),
        }
    }
}

/// A connection to one node or to a cluster.
#[derive(Clone)]
pub enum RedisConn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// `REDIS_CLUSTER_URLS` and `STREAM_PARTITIONS`: where the streams are, and how many there
/// are. Every service that reads or writes the events takes both, and all must agree.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Topology {
    /// Seed nodes of a Redis Cluster, comma-separated (`redis://user:pass@host:port`); set,
    /// the cluster is used instead of REDIS_URL.
    #[arg(long, env = "REDIS_CLUSTER_URLS", value_delimiter = ',', hide_env_values = true)]
    pub redis_cluster_urls: Vec<String>,
    /// Streams the events are spread over, by a stable hash of `aggregate_id` (FNV-1a): 1 is
    /// REDIS_STREAM itself; N > 1 names them `<REDIS_STREAM>.p<i>{<tag>}`. Every relay,
    /// consumer and feed must use the same N; one that finds another N recorded refuses to
    /// work (see docs/SCALING.md).
    #[arg(long, env = "STREAM_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(domain::partition::MOST_PARTITIONS)))]
    pub stream_partitions: u16,
}

impl Topology {
    /// The Redis to use: the cluster if seed nodes are set, else `redis_url`.
    pub fn target(&self, redis_url: &str) -> RedisResult<RedisTarget> {
        let seeds: Vec<String> = self.redis_cluster_urls.iter().filter(|u| !u.trim().is_empty()).cloned().collect();
        RedisTarget::new(redis_url, &seeds)
    }

    /// The partitions of `stream`.
    pub fn partitions(&self, stream: &str) -> domain::Partitions {
        // The parser keeps the count in range.
        domain::Partitions::new(stream, self.stream_partitions).unwrap_or_else(|_| domain::Partitions::single(stream))
    }
}

/// The key that records over how many partitions the events of `stream` are spread.
pub fn partitions_key(stream: &str) -> String {
    format!("{stream}:partitions")
}

/// Checks `partitions` against the number recorded in Redis, first recording it if none is
/// and `may_record`: `Ok(Err(why))` when another number is recorded. Nothing recorded and
/// nothing recorded now (a reader that may not write) agrees.
pub async fn check_partitions(
    conn: &mut (impl ConnectionLike + Send),
    partitions: &domain::Partitions,
    may_record: bool,
) -> RedisResult<Result<(), String>> {
    let key = partitions_key(partitions.base());
    let recorded: Option<String> = if may_record {
        redis::cmd("SET").arg(&key).arg(partitions.count()).arg("NX").arg("GET").query_async(conn).await?
    } else {
        redis::cmd("GET").arg(&key).query_async(conn).await?
    };
    Ok(match recorded {
        Some(n) if n != partitions.count().to_string() => Err(format!(
            "STREAM_PARTITIONS is {}, but the events of {} are spread over {n} partitions (recorded in the key {key}); \
             changing the number on a running system is refused: stop the relays, let every group drain every \
             partition, then delete that key (docs/SCALING.md)",
            partitions.count(),
            partitions.base(),
        )),
        _ => Ok(()),
    })
}

/// Whether this service's STREAM_PARTITIONS is the number the streams have, checked (and
/// recorded, if `may_record` and none is) once Redis answers. If not, `unfit` says why: the
/// service does no work and `/readyz` reports it. `false` also when `shutdown` came first.
pub async fn agree_on_partitions(
    target: &RedisTarget,
    partitions: &domain::Partitions,
    may_record: bool,
    unfit: &std::sync::OnceLock<String>,
    shutdown: &service_kit::Shutdown,
) -> bool {
    match checked_partitions(target, partitions, may_record, shutdown).await {
        Some(Ok(())) => true,
        Some(Err(why)) => {
            tracing::error!(reason = why, "refusing to work on the streams");
            let _ = unfit.set(why);
            false
        }
        None => false,
    }
}

/// [`check_partitions`] until Redis answers: `None` if `shutdown` came first.
async fn checked_partitions(
    target: &RedisTarget,
    partitions: &domain::Partitions,
    may_record: bool,
    shutdown: &service_kit::Shutdown,
) -> Option<Result<(), String>> {
    let mut retry = service_kit::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let checked = match target.connect(Timeouts::new(Duration::from_secs(2), Duration::from_secs(5))).await {
            Ok(mut conn) => check_partitions(&mut conn, partitions, may_record).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(agreed) => return Some(agreed),
            // One stream needs no agreement: a Redis user made before there were partitions
            // may not read the key, and that is no reason to stop.
            Err(e) if partitions.count() == 1 && e.code() == Some("NOPERM") => {
                tracing::warn!(error = %e, key = partitions_key(partitions.base()),
                    "cannot record STREAM_PARTITIONS=1 (the Redis user may not); going on with the one stream");
                return Some(Ok(()));
            }
            // Not Redis being away, which passes, but a refusal (of the user, of the key's
            // type, of the command), which does not.
            Err(e) if super::failure::of_redis(&e) == service_kit::FailureClass::permanent => {
                return Some(Err(format!(
                    "cannot check STREAM_PARTITIONS against {}: {e}",
                    partitions_key(partitions.base())
                )));
            }
            Err(e) => tracing::warn!(error = %e, "cannot check STREAM_PARTITIONS against Redis yet; trying again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(retry.next_delay()) => {}
        }
    }
}
