use std::net::SocketAddr;
use std::time::Duration;

use telemetry::LogFormat;

/// Settings of order-service, from flags or the environment (flags win).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-service", version, about = "The orders HTTP API (transactional outbox writer)")]
pub struct Config {
    /// Postgres URL of the orders database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// HTTP listen address; port 0 picks a free port (the bound address is logged at start).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

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
}

impl Config {
    /// A configuration with defaults for everything but the database.
    pub fn new(database_url: impl Into<String>, http_addr: SocketAddr) -> Self {
        Self {
            database_url: database_url.into(),
            http_addr,
            log_format: LogFormat::Text,
            database_max_connections: 10,
            request_timeout_ms: 10_000,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
