//! Settings, from the environment or matching flags (see the contract).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use service_kit::auth::AuthSettings;
use service_kit::http::HttpSettings;
use service_kit::parse_duration;
use telemetry::LogFormat;

#[derive(Debug, Clone, Parser)]
#[command(name = "order-feed", version, about = "Serves the order events live over Server-Sent Events")]
pub struct Config {
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,
    #[command(flatten)]
    pub topology: broker::redis::target::Topology,
    #[command(flatten)]
    pub broker: broker::BrokerArgs,
    /// Stream the events are read from (every replica reads all of it, with plain XREAD). With
    /// STREAM_PARTITIONS > 1, the partitions named after it, merged in one order every replica
    /// shares; they are polled every 20 ms (N read-only scripts per replica), and an event
    /// waits, besides, for the slowest clock among the Redis nodes holding the partitions.
    #[arg(long, env = "REDIS_STREAM", default_value = "orders.events")]
    pub redis_stream: String,
    /// HTTP listen address: `/events`, the live page `/`, `/healthz`, `/readyz` (port 0 = any
    /// free port).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8082")]
    pub http_addr: SocketAddr,
    /// Admin listen address: /metrics, /healthz, /readyz (port 0 = any free port; the same
    /// address as HTTP_ADDR serves /metrics there too).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9082")]
    pub admin_addr: SocketAddr,
    /// Events kept in memory, in stream order, for clients that resume: a cursor older than
    /// these is answered with a `reset` message. At start the replica loads the stream's last
    /// this many entries.
    #[arg(long, env = "FEED_HISTORY", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub history: u64,
    /// Clients served at once by this replica; more are answered 503 (they retry elsewhere).
    /// Keep it below HTTP_MAX_CONNECTIONS (4096), which would otherwise turn them away first.
    #[arg(long, env = "FEED_MAX_CLIENTS", default_value_t = 4000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_clients: u32,
    /// Events a client may fall behind the stream before it is disconnected (it resumes from
    /// where it was, with its `Last-Event-ID`).
    #[arg(long, env = "FEED_CLIENT_LAG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_lag: u32,
    /// Interval of the heartbeat comment sent to an idle client.
    #[arg(long, env = "FEED_HEARTBEAT", default_value = "15s", value_parser = positive_duration)]
    pub heartbeat: Duration,
    /// How long one read of the stream waits for new entries (with STREAM_PARTITIONS > 1 reads
    /// do not wait: the feed polls). Redis gets this plus 10 s to answer.
    #[arg(long, env = "FEED_BLOCK", default_value = "1s", value_parser = positive_duration)]
    pub block: Duration,
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// A duration above zero (a zero heartbeat or read wait would spin).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".to_owned()),
        d => Ok(d),
    }
}
