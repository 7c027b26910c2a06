//! Shared fixtures: a migrated database per test, a unique stream, relays run in-process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use domain::StreamEntry;
use redis::AsyncCommands;
use relay::Config;
use service_kit::{Service, Shutdown};
use sqlx::PgPool;
use test_support::TestDatabase;
use tokio::task::JoinHandle;

pub async fn migrated_database(prefix: &str) -> TestDatabase {
    let db = test_support::fresh_database(prefix).await;
    outbox::MIGRATOR.run(&db.pool).await.expect("migrate");
    db
}

pub fn config(database_url: &str, redis_url: &str, stream: &str) -> Config {
    Config {
        database_url: database_url.to_owned(),
        database_migration_url: None,
        database_runtime_role: "outbox_relay".parse().expect("role"),
        redis_url: redis_url.to_owned(),
        redis_stream: stream.to_owned(),
        redis_min_replicas: 0,
        redis_wait_timeout: Duration::from_secs(1),
        topology: Default::default(),
        broker: Default::default(),
        http_addr: "127.0.0.1:0".parse().expect("address"),
        // /metrics on the same listener as /healthz (the tests read it there).
        admin_addr: "127.0.0.1:0".parse().expect("address"),
        batch_size: 1000,
        workers: 2,
        lease: Duration::from_secs(30),
        poll_interval: Duration::from_millis(200),
        max_attempts: 10,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(15 * 60),
        retention: Duration::from_secs(24 * 3600),
        stream_retention: Duration::from_secs(3600),
        max_payload_bytes: 1024 * 1024,
        upkeep_interval: Duration::from_secs(5),
        db_statement_timeout: Duration::from_secs(30),
        db_lock_timeout: Duration::from_secs(5),
        http: service_kit::http::HttpSettings::default(),
        log_format: telemetry::LogFormat::Text,
    }
}

pub struct RunningRelay {
    pub addr: SocketAddr,
    /// The admin listener, when apart from `addr`.
    pub admin: Option<SocketAddr>,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), service_kit::StartError>>,
}

impl RunningRelay {
    pub async fn start(config: Config) -> Self {
        let relay = relay::Relay::bind(config).await.expect("bind relay");
        let (addr, admin) = (relay.local_addr(), relay.admin_addr());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self { addr, admin, shutdown, task }
    }

    /// Requests shutdown and waits for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        result.expect("relay stops within 30 s").expect("relay task not panicked").expect("relay exits cleanly");
    }
}

/// Appends one event for `aggregate_id` in its own transaction.
pub async fn append(pool: &PgPool, aggregate_id: &str, payload: &str) -> outbox::Appended {
    append_with(pool, aggregate_id, payload, false).await
}

/// [`append`]; `notify`: the transaction wakes the relays at its commit.
pub async fn append_with(pool: &PgPool, aggregate_id: &str, payload: &str, notify: bool) -> outbox::Appended {
    let mut tx = pool.begin().await.expect("begin");
    let appended = outbox::append(
        &mut tx,
        outbox::NewEvent {
            aggregate_type: "order",
            aggregate_id,
            event_type: "OrderConfirmed",
            payload,
            occurred_at: Utc::now(),
            notify,
        },
    )
    .await
    .expect("append");
    tx.commit().await.expect("commit");
    appended
}

/// The value of the counter `name` (without `_total`) on a relay's `/metrics`.
pub async fn counter(relay: &RunningRelay, name: &str) -> f64 {
    let text =
        reqwest::get(format!("http://{}/metrics", relay.addr)).await.expect("metrics").text().await.expect("body");
    let line = format!("{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {name}_total in\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

/// Appends `events` events spread over the orders `o-0` … `o-{orders - 1}` (each order's in
/// seq order), then wakes the relays.
pub async fn append_spread(pool: &PgPool, events: usize, orders: usize) {
    for i in 0..events {
        append(pool, &format!("o-{}", i % orders), &order_payload("x")).await;
    }
    notify(pool).await;
}

pub fn order_payload(aggregate_id: &str) -> String {
    serde_json::json!({ "order_id": aggregate_id }).to_string()
}

pub async fn notify(pool: &PgPool) {
    sqlx::query("SELECT pg_notify($1, '')").bind(outbox::CHANNEL).execute(pool).await.expect("notify");
}

/// Every entry of `stream`, decoded, in stream order.
pub async fn read_stream(redis_url: &str, stream: &str) -> Vec<StreamEntry> {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let fields: Vec<(String, Vec<u8>)> = entry
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<Vec<u8>>(&v).expect("bulk string")))
                .collect();
            StreamEntry::from_fields(fields).expect("entry decodes")
        })
        .collect()
}

/// The distinct event ids on `stream`, sorted (an event published twice counts once).
pub async fn distinct_event_ids(redis_url: &str, stream: &str) -> Vec<String> {
    let mut ids: Vec<String> = read_stream(redis_url, stream).await.iter().map(|e| e.event_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    ids
}

pub async fn stream_len(redis_url: &str, stream: &str) -> usize {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    conn.xlen(stream).await.expect("XLEN")
}

pub async fn delete_stream(redis_url: &str, stream: &str) {
    let client = redis::Client::open(redis_url).expect("redis url");
    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
        let _: Result<(), _> = conn.del(stream).await;
    }
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect("count query")
}

pub async fn wait_until_published(pool: &PgPool, expected: i64, timeout: Duration) {
    test_support::eventually("every event moved to outbox_published", timeout, || async {
        (count(pool, "SELECT count(*) FROM outbox_published").await == expected).then_some(())
    })
    .await;
}

/// A claim connection with `pool`'s settings.
pub async fn claim_conn(pool: &PgPool) -> outbox::claim::ClaimConnection {
    outbox::claim::ClaimConnection::connect(&pool.connect_options()).await.expect("claim connection")
}

/// A pool with the relay's connection settings, its claims ending after `lease` idle.
pub async fn claim_pool(url: &str, lease: Duration) -> PgPool {
    let limits = service_kit::SessionLimits {
        statement: Duration::from_secs(30),
        lock: Duration::from_secs(5),
        idle_in_transaction: lease,
    };
    let options = relay::config::connect_options(url, &limits).expect("options");
    sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options).await.expect("claim pool")
}

/// An `OrderConfirmed` entry of the order `aggregate_id` (seq 1), as a relay would publish it.
pub fn confirmed_entry(aggregate_id: &str) -> StreamEntry {
    StreamEntry {
        event_id: ulid::Ulid::new(),
        event_type: "OrderConfirmed".into(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.to_owned(),
        seq: 1,
        occurred_at: chrono::Utc::now(),
        payload: "{}".into(),
        traceparent: None,
        tracestate: None,
        tenant_id: domain::TenantId::default_tenant(),
    }
}
