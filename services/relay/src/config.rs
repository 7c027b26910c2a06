//! Command line and environment configuration.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use service_kit::http::HttpSettings;
use service_kit::session::RoleName;
use service_kit::{parse_duration, SessionLimits};
use sqlx::postgres::PgConnectOptions;
use telemetry::LogFormat;

/// Postgres outbox → Redis stream relay.
#[derive(Debug, Clone, Parser)]
#[command(name = "relay", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Relay events until SIGTERM (the default).
    Run,
    /// Publish retained (already published) events again, in id order.
    Replay {
        /// Events published since this RFC 3339 time, or this long ago ("15m", "2h").
        #[arg(long, value_parser = parse_since)]
        since: Since,
        /// Only this aggregate's events.
        #[arg(long)]
        aggregate_id: Option<String>,
    },
    /// Inspect or retry dead events.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Inspect the stream's consumer groups, or remove one nobody reads any more.
    #[command(subcommand)]
    Stream(StreamCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum StreamCommand {
    /// Print the stream's length and each group: name, pending, lag.
    Groups,
    /// Remove a consumer group (`XGROUP DESTROY`): the stream is then trimmed without waiting
    /// for it. Its pending entries are dropped with it.
    DropGroup {
        /// The group to remove.
        group: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DeadCommand {
    /// Print dead events: event_id, aggregate_id, seq, attempts, last_error.
    List,
    /// Make dead events pending again (attempts reset) and wake the relays.
    Retry {
        /// The event to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        event_id: Option<String>,
        /// Retry every dead event.
        #[arg(long)]
        all: bool,
    },
    /// Remove dead events written longer ago than `--older-than`, each with the later events
    /// of its order still waiting behind it (they could never be delivered in order), and
    /// print what was removed.
    Purge {
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
}

/// Settings of a relay.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The orders database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Postgres URL the migrations and vacuuming run on, as the tables' owner (default:
    /// DATABASE_URL).
    #[arg(long, env = "DATABASE_MIGRATION_URL", hide_env_values = true)]
    pub database_migration_url: Option<String>,
    /// Role the relay's work runs as (every session starts as it). It must see every tenant's
    /// outbox rows: the migrations create `outbox_relay` with a policy for that and only the
    /// privileges relaying needs; DATABASE_URL's user must be a member of it.
    #[arg(long, env = "DATABASE_RUNTIME_ROLE", default_value = "outbox_relay")]
    pub database_runtime_role: RoleName,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,
    /// Stream the events go to.
    #[arg(long, env = "REDIS_STREAM", default_value = "orders.events")]
    pub redis_stream: String,
    /// Replicas that must hold a batch (Redis `WAIT`) before it counts as published; 0: the
    /// primary's acknowledgement suffices. A batch not confirmed in time goes back to the
    /// outbox and is published again: a duplicate at worst, never an event a failover lost.
    #[arg(long, env = "REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,
    /// How long a batch waits for REDIS_MIN_REPLICAS replicas to confirm it.
    #[arg(long, env = "REDIS_WAIT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_wait_timeout: Duration,
    #[command(flatten)]
    pub topology: broker::redis::target::Topology,
    #[command(flatten)]
    pub broker: broker::BrokerArgs,
    /// HTTP listen address for /healthz, /readyz (port 0 = any free port).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9100")]
    pub http_addr: SocketAddr,
    /// Admin listen address: /metrics, /healthz, /readyz (port 0 = any free port; the same
    /// address as HTTP_ADDR serves /metrics there too).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9101")]
    pub admin_addr: SocketAddr,
    /// Rows claimed (and published in one pipeline) per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Batches in flight at once in this relay: while one is being published, the next is
    /// claimed (each is its own claim, so order per aggregate holds as across relays).
    #[arg(long, env = "OUTBOX_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub workers: u32,
    /// How long a claim may wait between its statements (e.g. a relay paused while publishing)
    /// before the database ends it, freeing its rows for other relays.
    #[arg(long, env = "OUTBOX_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Fallback poll interval when no notification arrives.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Attempts before a row is dead-lettered.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Delay after the first failed attempt; ×3 per further attempt.
    #[arg(long, env = "OUTBOX_BACKOFF_BASE", default_value = "1s", value_parser = parse_duration)]
    pub backoff_base: Duration,
    /// Cap of the retry delay.
    #[arg(long, env = "OUTBOX_BACKOFF_MAX", default_value = "15m", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// How long published events are kept for replay.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,
    /// Stream entries that every consumer group has acknowledged and that are older than this
    /// are trimmed; an entry some group still needs is never trimmed.
    #[arg(long, env = "REDIS_STREAM_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub stream_retention: Duration,
    /// Payloads larger than this are dead-lettered instead of published.
    #[arg(long, env = "OUTBOX_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// How often the relay checks whether `outbox` and `outbox_published` need a vacuum or an
    /// analyze, and runs it ("0" turns this off and leaves both to autovacuum).
    #[arg(long, env = "DB_UPKEEP_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub upkeep_interval: Duration,
    /// Longest statement on the relay's database sessions (its idle-in-transaction timeout is
    /// `OUTBOX_LEASE`).
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub db_statement_timeout: Duration,
    /// Longest wait for a lock on the relay's database sessions.
    #[arg(long, env = "DB_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_lock_timeout: Duration,
    #[command(flatten)]
    pub http: HttpSettings,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The limits of every database session: a claim's transaction idle for the lease is ended.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            statement: self.db_statement_timeout,
            lock: self.db_lock_timeout,
            idle_in_transaction: self.lease,
        }
    }
}

/// The start of a replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    At(DateTime<Utc>),
    Ago(Duration),
}

impl Since {
    pub fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::At(t) => t,
            Self::Ago(d) => chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }
}

pub fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(t.with_timezone(&Utc)));
    }
    parse_duration(s).map(Since::Ago).map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration like 15m"))
}

/// Options of every relay connection: the session limits ([`Config::session_limits`]: a
/// claim's transaction ends once it sits idle for the lease), relay commits need not wait for
/// the WAL flush (if a crash loses one, its rows come back and are published again, which
/// consumers deduplicate; the events themselves were committed durably by their writers), and
/// no JIT (the claim's estimated cost triggers JIT compilation, which costs far more than the
/// claim itself).
pub fn connect_options(database_url: &str, limits: &SessionLimits) -> Result<PgConnectOptions, sqlx::Error> {
    let options = limits.apply(database_url.parse::<PgConnectOptions>()?, "relay");
    Ok(options.options([("synchronous_commit", "off"), ("jit", "off")]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_durations() {
        let now = Utc::now();
        assert_eq!(parse_since("15m").map(|s| s.resolve(now)), Ok(now - chrono::Duration::minutes(15)));
        let at = parse_since("2026-01-02T03:04:05Z").map(|s| s.resolve(now)).map(|t| t.to_rfc3339());
        assert_eq!(at.as_deref(), Ok("2026-01-02T03:04:05+00:00"));
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn cli_parses_subcommands_and_defaults() {
        let cli = Cli::try_parse_from(["relay", "--database-url", "postgres://x/y", "dead", "retry", "--all"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Dead(DeadCommand::Retry { event_id: None, all: true }))));
        assert_eq!(cli.config.batch_size, 1000);
        assert_eq!(cli.config.workers, 2);
        assert_eq!(cli.config.lease, Duration::from_secs(30));
        assert!(Cli::try_parse_from(["relay", "--database-url", "x", "dead", "retry"]).is_err());
        let cli =
            Cli::try_parse_from(["relay", "--database-url", "x", "dead", "purge", "--older-than", "30d"]).unwrap();
        let month = Duration::from_secs(30 * 86_400);
        assert!(matches!(cli.command, Some(Command::Dead(DeadCommand::Purge { older_than })) if older_than == month));
        let cli = Cli::try_parse_from(["relay", "--database-url", "x", "stream", "drop-group", "old"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Stream(StreamCommand::DropGroup { group })) if group == "old"));
        assert_eq!(cli.config.stream_retention, Duration::from_secs(3600));
        let cli =
            Cli::try_parse_from(["relay", "--database-url", "x", "replay", "--since", "2h", "--aggregate-id", "a"]);
        assert!(matches!(cli.unwrap().command, Some(Command::Replay { aggregate_id: Some(_), .. })));
    }
}
