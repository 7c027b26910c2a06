//! Settings, from the environment or matching flags (see the contract).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use service_kit::auth::AuthSettings;
use service_kit::http::HttpSettings;
use service_kit::session::RoleName;
use service_kit::{parse_duration, SessionLimits};
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
    /// Applies the inventory database's migrations and exits (the service applies them too as
    /// it starts; the other commands expect them applied).
    Migrate,
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
    /// Removes dead letters recorded longer ago than `--older-than`.
    Purge {
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
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
    /// Postgres URL the migrations and vacuuming run on, as the tables' owner (default:
    /// DATABASE_URL).
    #[arg(long, env = "DATABASE_MIGRATION_URL", hide_env_values = true)]
    pub database_migration_url: Option<String>,
    /// Role every stock API transaction runs as (`SET LOCAL ROLE`), which row-level security
    /// applies to: not a superuser, not the tables' owner, no BYPASSRLS. The migrations create
    /// `inventory_app` with the privileges the API needs; another role must be a member of it.
    #[arg(long, env = "DATABASE_RUNTIME_ROLE", default_value = "inventory_app")]
    pub database_runtime_role: RoleName,
    /// Role the consumer loop (and the rest of the service's work but the stock API's
    /// transactions) runs as: every session starts as it. It must see every tenant's stock:
    /// the migrations create `inventory_consumer` with a policy for that and only the
    /// privileges applying events needs; DATABASE_URL's user must be a member of it.
    #[arg(long, env = "DATABASE_CONSUMER_ROLE", default_value = "inventory_consumer")]
    pub database_consumer_role: RoleName,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[command(flatten)]
    pub topology: broker::redis::target::Topology,
    #[command(flatten)]
    pub broker: broker::BrokerArgs,
    #[arg(long, env = "REDIS_STREAM", default_value = "orders.events")]
    pub redis_stream: String,
    #[arg(long, env = "CONSUMER_GROUP", default_value = "inventory")]
    pub consumer_group: String,
    /// This replica's name in the group (default: host name + pid).
    #[arg(long, env = "CONSUMER_NAME", default_value_t = default_consumer_name())]
    pub consumer_name: String,
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8081")]
    pub http_addr: SocketAddr,
    /// Admin listen address: /metrics, /healthz, /readyz (port 0 = any free port; the same
    /// address as HTTP_ADDR serves /metrics there too).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9081")]
    pub admin_addr: SocketAddr,
    /// Entries pending this long on a (probably dead) replica are claimed, e.g. `30s`.
    #[arg(long, env = "CLAIM_MIN_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_min_idle: Duration,
    /// An entry whose processing failed this often for reasons of its own (it breaks a rule of
    /// the database) is dead-lettered. Deliveries that ended otherwise (a restart, a claim, an
    /// outage of Redis or Postgres) are not counted.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,
    /// Entries read (and applied in one transaction) at a time.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How long one read waits for new entries, e.g. `1s`.
    #[arg(long, env = "BLOCK", default_value = "1s", value_parser = parse_duration)]
    pub block: Duration,
    /// Postgres pool size (inventory API, readiness, retention); batches are applied on one
    /// more connection of their own, and migrations and upkeep on the owner's.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
    /// How often the consumer checks whether its tables need a vacuum or an analyze, and runs
    /// it ("0" turns this off and leaves them to autovacuum).
    #[arg(long, env = "DB_UPKEEP_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub upkeep_interval: Duration,
    /// Longest statement on the consumer's database sessions (default: half of
    /// CLAIM_MIN_IDLE, at most 15s; must be below CLAIM_MIN_IDLE).
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", value_parser = parse_duration)]
    pub db_statement_timeout: Option<Duration>,
    /// Longest wait for a lock (default: a quarter of CLAIM_MIN_IDLE, at most 5s; must be
    /// below CLAIM_MIN_IDLE).
    #[arg(long, env = "DB_LOCK_TIMEOUT", value_parser = parse_duration)]
    pub db_lock_timeout: Option<Duration>,
    /// How long a transaction may sit idle before the server ends it and releases its locks,
    /// e.g. when this replica is frozen mid-batch (default: half of CLAIM_MIN_IDLE, at most
    /// 10s; must be below CLAIM_MIN_IDLE, so a replica that claims a frozen one's entries does
    /// not find their rows still locked).
    #[arg(long, env = "DB_IDLE_IN_TRANSACTION_TIMEOUT", value_parser = parse_duration)]
    pub db_idle_in_transaction_timeout: Option<Duration>,
    /// Dedupe and ordering state (`processed_messages`; checkpoints and reservations of
    /// cancelled orders) older than this is pruned, and an event that occurred longer ago than
    /// this is dead-lettered as `expired`, never applied.
    #[arg(long, env = "DEDUPE_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub dedupe_retention: Duration,
    /// Dead letters recorded longer ago than this are removed (`dead-letters purge` removes
    /// them sooner by hand).
    #[arg(long, env = "DEAD_LETTER_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub dead_letter_retention: Duration,
    /// An event parked this long (waiting for one before it that does not come) is a gap that
    /// is not filling: logged as a warning, besides the `consumer_parked_oldest_age_seconds`
    /// gauge.
    #[arg(long, env = "PARKED_WARN_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub parked_warn_after: Duration,
    /// Cap of the dead-letter stream `<REDIS_STREAM>.dlq` (about this many entries; the oldest
    /// go first). The `dead_letters` table stays the record.
    #[arg(long, env = "REDIS_DLQ_MAX_LEN", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub dlq_max_len: u64,
    /// A consumer of the group with nothing pending and idle this long has left (a replica
    /// replaced under another name) and is removed from the group.
    #[arg(long, env = "CONSUMER_DEPARTED_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub departed_after: Duration,
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The dead-letter stream: `<REDIS_STREAM>.dlq`.
    pub fn dlq_stream(&self) -> String {
        format!("{}.dlq", self.redis_stream)
    }

    /// The limits of every database session, each below `CLAIM_MIN_IDLE`: by the time another
    /// replica claims the entries of one that froze mid-batch, the server has ended that batch
    /// and released its locks.
    pub fn session_limits(&self) -> Result<SessionLimits, String> {
        let claim = self.claim_min_idle;
        let limits = SessionLimits {
            statement: self.db_statement_timeout.unwrap_or((claim / 2).min(Duration::from_secs(15))),
            lock: self.db_lock_timeout.unwrap_or((claim / 4).min(Duration::from_secs(5))),
            idle_in_transaction: self
                .db_idle_in_transaction_timeout
                .unwrap_or((claim / 2).min(Duration::from_secs(10))),
        };
        for (name, value) in [
            ("DB_STATEMENT_TIMEOUT", limits.statement),
            ("DB_LOCK_TIMEOUT", limits.lock),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT", limits.idle_in_transaction),
        ] {
            if value >= claim || value.is_zero() {
                return Err(format!("{name} ({value:?}) must be above zero and below CLAIM_MIN_IDLE ({claim:?})"));
            }
        }
        Ok(limits)
    }
}

fn default_consumer_name() -> String {
    service_kit::messaging::instance_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, clap::Error> {
        let base = ["inventory-consumer", "--database-url", "postgres://x/y"];
        Cli::try_parse_from(base.iter().chain(args)).map(|cli| cli.config)
    }

    #[test]
    fn session_limits_default_below_claim_min_idle_and_refuse_to_reach_it() {
        let limits = config(&[]).unwrap().session_limits().unwrap();
        assert_eq!(
            (limits.statement, limits.lock, limits.idle_in_transaction),
            (
                Duration::from_secs(15),
                Duration::from_millis(7_500).min(Duration::from_secs(5)),
                Duration::from_secs(10)
            )
        );
        let short = config(&["--claim-min-idle", "2s"]).unwrap().session_limits().unwrap();
        assert_eq!(
            (short.statement, short.lock, short.idle_in_transaction),
            (Duration::from_secs(1), Duration::from_millis(500), Duration::from_secs(1))
        );
        let refused = config(&["--claim-min-idle", "5s", "--db-idle-in-transaction-timeout", "5s"]).unwrap();
        assert!(refused.session_limits().unwrap_err().contains("DB_IDLE_IN_TRANSACTION_TIMEOUT"));
    }
}
