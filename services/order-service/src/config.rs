use std::net::SocketAddr;
use std::time::Duration;

use service_kit::auth::AuthSettings;
use service_kit::http::HttpSettings;
use service_kit::session::RoleName;
use service_kit::{parse_duration, SessionLimits};
use telemetry::LogFormat;

/// Settings of order-service, from flags or the environment (flags win).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "order-service",
    version,
    about = "The orders HTTP API (transactional outbox writer)",
    after_help = "Commands (instead of serving):\n  order-service migrate   apply the migrations and exit\n  order-service token     mint a bearer token for development (see `order-service token --help`)"
)]
pub struct Config {
    /// Postgres URL of the orders database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Postgres URL the migrations and vacuuming run on, as the tables' owner (default:
    /// DATABASE_URL).
    #[arg(long, env = "DATABASE_MIGRATION_URL", hide_env_values = true)]
    pub database_migration_url: Option<String>,

    /// Role every request transaction runs as (`SET LOCAL ROLE`), which row-level security
    /// applies to: not a superuser, not the tables' owner, no BYPASSRLS. The migrations create
    /// `outbox_app` with the privileges requests need; another role must be a member of it.
    #[arg(long, env = "DATABASE_RUNTIME_ROLE", default_value = "outbox_app")]
    pub database_runtime_role: RoleName,

    /// Role the removal of expired idempotency keys runs as (its sessions start as it). It must
    /// see every tenant's keys: the migrations create `outbox_key_expiry` with a policy for
    /// that and only what the removal needs; DATABASE_URL's user must be a member of it.
    #[arg(long, env = "DATABASE_KEY_EXPIRY_ROLE", default_value = "outbox_key_expiry")]
    pub database_key_expiry_role: RoleName,

    /// HTTP listen address; port 0 picks a free port (the bound address is logged at start).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Admin listen address: /metrics, /healthz, /readyz (port 0 = any free port; the same
    /// address as HTTP_ADDR serves /metrics on the API's listener too).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9080")]
    pub admin_addr: SocketAddr,

    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Postgres connections for API requests (up to 3 more are opened: migrations, readiness
    /// checks, relay wake-ups).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_connections: u32,

    /// Longest time one API request may take before it is abandoned (and its transaction
    /// rolled back) with 503, in milliseconds. Also bounds how long shutdown waits for it.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    /// Longest statement on the service's database sessions.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub db_statement_timeout: Duration,

    /// Longest wait for a lock (an order row locked by a concurrent confirm or cancel).
    #[arg(long, env = "DB_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_lock_timeout: Duration,

    /// How long a transaction may sit idle before the server ends it and releases its locks.
    #[arg(long, env = "DB_IDLE_IN_TRANSACTION_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub db_idle_in_transaction_timeout: Duration,

    /// How long a stored response answers retries with its `Idempotency-Key`; older keys are
    /// removed, and a request reusing one creates a new order.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_key_ttl: Duration,

    /// How often the service checks whether `idempotency_keys` (whose expired keys it removes)
    /// needs a vacuum or an analyze, and runs it ("0" leaves it to autovacuum).
    #[arg(long, env = "DB_UPKEEP_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub upkeep_interval: Duration,

    #[command(flatten)]
    pub http: HttpSettings,

    #[command(flatten)]
    pub auth: AuthSettings,
}

impl Config {
    /// A configuration with defaults for everything but the database and the address, on which
    /// `/metrics` is served too (no admin listener of its own).
    pub fn new(database_url: impl Into<String>, http_addr: SocketAddr) -> Self {
        Self {
            database_url: database_url.into(),
            database_migration_url: None,
            database_runtime_role: RoleName::parse("outbox_app").unwrap_or_else(|e| unreachable!("{e}")),
            database_key_expiry_role: RoleName::parse("outbox_key_expiry").unwrap_or_else(|e| unreachable!("{e}")),
            http_addr,
            admin_addr: http_addr,
            log_format: LogFormat::Text,
            database_max_connections: 10,
            request_timeout_ms: 10_000,
            db_statement_timeout: Duration::from_secs(10),
            db_lock_timeout: Duration::from_secs(5),
            db_idle_in_transaction_timeout: Duration::from_secs(15),
            idempotency_key_ttl: Duration::from_secs(24 * 3600),
            upkeep_interval: Duration::from_secs(5),
            http: HttpSettings::default(),
            auth: AuthSettings::default(),
        }
    }

    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            statement: self.db_statement_timeout,
            lock: self.db_lock_timeout,
            idle_in_transaction: self.db_idle_in_transaction_timeout,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
