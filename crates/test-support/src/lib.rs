//! Fixtures for tests against real servers.
//!
//! Each test gets its own database ([`fresh_database`]) and stream keys ([`unique_name`]) on
//! the shared Postgres and Redis, so tests run in parallel. A test that kills or stops a server
//! starts a private one ([`PrivateRedis`], [`PrivatePostgres`]) so the shared ones are never
//! disturbed.

mod private;
pub mod sse;

pub use private::{PrivateNats, PrivatePostgres, PrivateRedis, PrivateRedisCluster};

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// A local port nobody listens on right now, and that this process has not handed out before.
/// Ports are picked before the servers that take them start (a cluster picks one per service,
/// then starts them), so a port released by one pick could otherwise come back from the next,
/// and two servers would be told the same one. Another process could still take it first; in
/// practice that window is tiny.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free local port");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no local port free that this process has not handed out already");
}

/// Admin URL of the shared Postgres (`TEST_POSTGRES_URL`, default local trust auth).
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// URL of the shared Redis (`TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// URL of the shared NATS server, with JetStream (`TEST_NATS_URL`, default
/// `nats://127.0.0.1:4222`).
pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A name no other test uses: `{prefix}-{ulid}` (lower case).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new()).to_lowercase()
}

/// A database created for one test.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

/// Replaces the database name in a Postgres URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

/// Creates an empty database named after `prefix` on the server at `admin_url`.
pub async fn fresh_database_on(admin_url: &str, prefix: &str) -> TestDatabase {
    let name = format!("t_{}_{}", prefix, ulid::Ulid::new()).to_lowercase();
    let mut admin = PgConnection::connect(admin_url).await.expect("connect to Postgres (is it running?)");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.expect("create test database");
    admin.close().await.ok();
    let url = with_database(admin_url, &name);
    let pool = PgPoolOptions::new().max_connections(20).connect(&url).await.expect("connect to test database");
    TestDatabase { name, url, pool }
}

/// Creates an empty database on the shared Postgres.
pub async fn fresh_database(prefix: &str) -> TestDatabase {
    fresh_database_on(&postgres_admin_url(), prefix).await
}

/// A multiplexed connection to the shared Redis.
pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("valid REDIS url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis (is it running?)")
}

/// `XADD stream * field value …` on the shared Redis; the new entry's id.
pub async fn xadd<K: AsRef<str>, V: AsRef<str>>(stream: &str, fields: &[(K, V)]) -> String {
    let mut conn = redis_connection().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_ref()).arg(v.as_ref());
    }
    cmd.query_async(&mut conn).await.expect("XADD")
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One sample (summed over matching label sets) of `name` from a `/metrics` text: `label` is
/// a part of the label set, e.g. `class="transient"` (empty: every label set).
pub fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
