use std::time::Duration;

use clap::Parser;

use crate::LoadError;

/// Upper bounds that keep a mistyped flag from turning into an unbounded run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_ORDERS: u64 = 10_000_000;
pub const MAX_CONCURRENCY: usize = 1024;

/// Load against the order API of a system running on this machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, about)]
pub struct Config {
    /// Base URL of the order-service (must be on this machine).
    #[arg(long, env = "LOADGEN_ORDER_URL", default_value = "http://127.0.0.1:8080")]
    pub order_url: String,

    /// Base URL of one inventory-consumer, used to seed stock (must be on this machine).
    #[arg(long, env = "LOADGEN_INVENTORY_URL", default_value = "http://127.0.0.1:8081")]
    pub inventory_url: String,

    /// Bearer token for both APIs, when they require one (`order-service token --help`).
    #[arg(long, env = "LOADGEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Concurrent clients (sessions in flight at most).
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,

    /// New orders per second, scheduled by time (open loop). Unset: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Stop starting orders after this long ("500ms", "30s", "2m").
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Stop after starting this many orders.
    #[arg(long)]
    pub orders: Option<u64>,

    /// Share of created orders that are then confirmed.
    #[arg(long, default_value_t = 0.5)]
    pub confirm_ratio: f64,

    /// Share of created orders that are then cancelled (after the confirm, if both).
    #[arg(long, default_value_t = 0.2)]
    pub cancel_ratio: f64,

    /// Number of distinct SKUs the orders use.
    #[arg(long, default_value_t = 50)]
    pub skus: u32,

    /// SKU name prefix (SKUs are `<prefix>-<n>`).
    #[arg(long, default_value = "LOAD")]
    pub sku_prefix: String,

    /// Items per order are drawn from 1..=max-items.
    #[arg(long, default_value_t = 3)]
    pub max_items: u32,

    /// Before the run, set every SKU's on_hand to this via PUT /inventory/{sku}.
    #[arg(long)]
    pub seed_stock: Option<i64>,

    /// Send an Idempotency-Key with every create.
    #[arg(long)]
    pub idempotency_keys: bool,

    /// Per-request timeout; a request over it counts as an error "timeout".
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Orders database: with --inventory-database-url, measures end-to-end latency per event.
    #[arg(long, env = "LOADGEN_ORDERS_DATABASE_URL")]
    pub orders_database_url: Option<String>,

    /// Inventory database (the consumer's `processed_messages`).
    #[arg(long, env = "LOADGEN_INVENTORY_DATABASE_URL")]
    pub inventory_database_url: Option<String>,

    /// After the load, how long to wait for the consumer to apply every event of the run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub e2e_wait: Duration,

    /// Relay /metrics URLs (comma separated): report how many events each relay published.
    #[arg(long, value_delimiter = ',')]
    pub relay_metrics: Vec<String>,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,

    /// Seed of the random order mix (same seed, same orders).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Config {
    /// Checks the bounds and that every target is on this machine.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |field: &'static str, reason: String| Err(LoadError::Config { field, reason });
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return bad("concurrency", format!("must be 1..={MAX_CONCURRENCY}"));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
                return bad("rate", "must be > 0 and <= 1000000 orders/s".into());
            }
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return bad("duration", format!("must be > 0 and <= {}s", MAX_DURATION.as_secs()));
        }
        if self.orders.is_some_and(|n| n == 0 || n > MAX_ORDERS) {
            return bad("orders", format!("must be 1..={MAX_ORDERS}"));
        }
        for (field, ratio) in [("confirm-ratio", self.confirm_ratio), ("cancel-ratio", self.cancel_ratio)] {
            if !(0.0..=1.0).contains(&ratio) {
                return bad(field, "must be between 0 and 1".into());
            }
        }
        if self.skus == 0 || self.skus > 100_000 {
            return bad("skus", "must be 1..=100000".into());
        }
        if self.max_items == 0 || self.max_items > 100 {
            return bad("max-items", "must be 1..=100 (the API's limit)".into());
        }
        let sku_ok = !self.sku_prefix.is_empty()
            && self.sku_prefix.len() <= 24
            && self.sku_prefix.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
            && !self.sku_prefix.starts_with('-');
        if !sku_ok {
            return bad("sku-prefix", "must be 1..=24 of A-Z, 0-9, '-' and not start with '-'".into());
        }
        if self.seed_stock.is_some_and(|n| n < 0) {
            return bad("seed-stock", "must be >= 0".into());
        }
        if self.request_timeout.is_zero() || self.e2e_wait > MAX_DURATION {
            return bad("request-timeout", "must be > 0 (and e2e-wait <= 1h)".into());
        }
        if self.orders_database_url.is_some() != self.inventory_database_url.is_some() {
            return bad("orders-database-url", "give both database URLs or neither".into());
        }
        let urls = [("order-url", Some(&self.order_url)), ("inventory-url", Some(&self.inventory_url))];
        let dbs = [
            ("orders-database-url", self.orders_database_url.as_ref()),
            ("inventory-database-url", self.inventory_database_url.as_ref()),
        ];
        let relays = self.relay_metrics.iter().map(|u| ("relay-metrics", Some(u)));
        for (field, url) in urls.into_iter().chain(dbs).chain(relays) {
            if let Some(url) = url {
                if let Err(reason) = ensure_local(url) {
                    return bad(field, reason);
                }
            }
        }
        Ok(())
    }
}

/// Refuses any URL whose host is not this machine: the tool is a load generator, and pointing
/// it at someone else's server by mistake must not be possible.
pub fn ensure_local(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = parsed.host_str().unwrap_or_default();
    if host.is_empty() {
        // A Postgres URL without a host connects over the local Unix socket.
        return if parsed.scheme().starts_with("postgres") { Ok(()) } else { Err("has no host".into()) };
    }
    let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>();
    if host.eq_ignore_ascii_case("localhost") || ip.is_ok_and(|ip| ip.is_loopback()) {
        Ok(())
    } else {
        Err(format!("host {host} is not this machine (only localhost is allowed)"))
    }
}

/// Parses "250ms", "10s", "2m", "1h" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{s}` is not a duration like 500ms, 10s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("loadgen").chain(args.iter().copied()))
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn only_this_machine_is_a_target() {
        assert!(ensure_local("http://127.0.0.1:8080").is_ok());
        assert!(ensure_local("http://localhost:8080").is_ok());
        assert!(ensure_local("http://[::1]:8080").is_ok());
        assert!(ensure_local("postgres://postgres@127.0.0.1/orders").is_ok());
        assert!(ensure_local("http://example.com").is_err());
        assert!(ensure_local("http://10.0.0.5:8080").is_err());
        assert!(ensure_local("http://localhost.example.com").is_err());
        let err = config(&["--order-url", "http://192.168.1.2:8080"]).validate().unwrap_err();
        assert!(matches!(err, LoadError::Config { field: "order-url", .. }), "{err}");
        let err = config(&["--relay-metrics", "http://127.0.0.1:9100/metrics,http://8.8.8.8/metrics"])
            .validate()
            .unwrap_err();
        assert!(matches!(err, LoadError::Config { field: "relay-metrics", .. }), "{err}");
    }

    #[test]
    fn runs_are_bounded() {
        assert!(config(&[]).validate().is_ok());
        for (args, field) in [
            (&["--duration", "2h"][..], "duration"),
            (&["--concurrency", "0"][..], "concurrency"),
            (&["--orders", "0"][..], "orders"),
            (&["--rate", "0"][..], "rate"),
            (&["--confirm-ratio", "1.5"][..], "confirm-ratio"),
            (&["--sku-prefix", "lower"][..], "sku-prefix"),
            (&["--orders-database-url", "postgres://127.0.0.1/o"][..], "orders-database-url"),
        ] {
            match config(args).validate() {
                Err(LoadError::Config { field: f, .. }) => assert_eq!(f, field, "{args:?}"),
                other => panic!("{args:?} accepted: {other:?}"),
            }
        }
    }
}
