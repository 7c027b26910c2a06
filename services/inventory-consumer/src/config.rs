//! Settings, from the environment or matching flags (see the contract).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use service_kit::parse_duration;
use telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "inventory-consumer", version, about = "Applies order events from a Redis stream to inventory")]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect or re-drive dead-lettered entries.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Re-adds an already processed entry to the stream and shows the consumer skipping it.
    ReplayDemo {
        /// Stream entry id to replay (default: the oldest entry on the stream).
        entry_id: Option<String>,
        /// How long to wait for the consumer to handle the copy.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Lists dead letters (newest first).
    List {
        /// Include dead letters already re-driven.
        #[arg(long)]
        all: bool,
    },
    /// Re-adds the original fields of a dead letter to the stream.
    Redrive {
        /// Dead letter id (see `list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead letter not re-driven yet.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The inventory database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, env = "REDIS_STREAM", default_value = "orders.events")]
    pub redis_stream: String,
    #[arg(long, env = "CONSUMER_GROUP", default_value = "inventory")]
    pub consumer_group: String,
    /// This replica's name in the group (default: host name + pid).
    #[arg(long, env = "CONSUMER_NAME", default_value_t = default_consumer_name())]
    pub consumer_name: String,
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8081")]
    pub http_addr: SocketAddr,
    /// Entries pending this long on a (probably dead) replica are claimed, e.g. `30s`.
    #[arg(long, env = "CLAIM_MIN_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_min_idle: Duration,
    /// An entry delivered more often than this is dead-lettered.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,
    /// Entries read (and applied in one transaction) at a time.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How long one read waits for new entries, e.g. `1s`.
    #[arg(long, env = "BLOCK", default_value = "1s", value_parser = parse_duration)]
    pub block: Duration,
    /// Postgres pool size (inventory API, readiness, upkeep); batches are applied on one more
    /// connection of their own.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
    /// How often the consumer checks whether its tables need a vacuum or an analyze, and runs
    /// it ("0" turns this off and leaves them to autovacuum).
    #[arg(long, env = "DB_UPKEEP_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub upkeep_interval: Duration,
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Test hook: stop right after the first committed batch without acknowledging it, as a
    /// crash between commit and XACK would.
    #[arg(skip)]
    pub crash_after_commit: bool,
}

impl Config {
    /// The dead-letter stream: `<REDIS_STREAM>.dlq`.
    pub fn dlq_stream(&self) -> String {
        format!("{}.dlq", self.redis_stream)
    }
}

fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "consumer".to_owned());
    format!("{host}-{}", std::process::id())
}
