//! Feeds run in-process on a stream of their own, and events written as the relays write them.

// Each test crate uses its own share of these.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use domain::{StreamEntry, TenantId};
use order_feed::{Config, OrderFeed, Service, Shutdown};
use tokio::task::JoinHandle;
use ulid::Ulid;

pub use test_support::sse::{ids, SseClient};

pub fn config(stream: &str) -> Config {
    Config {
        redis_url: test_support::redis_url(),
        topology: Default::default(),
        broker: Default::default(),
        redis_stream: stream.to_owned(),
        http_addr: "127.0.0.1:0".parse().expect("address"),
        // /metrics on the same listener (the tests read it there).
        admin_addr: "127.0.0.1:0".parse().expect("address"),
        history: 1000,
        max_clients: 100,
        client_lag: 1000,
        heartbeat: Duration::from_secs(1),
        block: Duration::from_millis(100),
        http: service_kit::http::HttpSettings::default(),
        auth: service_kit::auth::AuthSettings::default(),
        log_format: telemetry::LogFormat::Text,
    }
}

pub struct RunningFeed {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    task: JoinHandle<Result<(), order_feed::StartError>>,
}

impl RunningFeed {
    /// Starts a feed and waits until it reads the stream.
    pub async fn start(config: Config) -> Self {
        let feed = OrderFeed::bind(config).await.expect("bind");
        let addr = feed.local_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(feed.run(shutdown.clone()));
        let running = Self { addr, shutdown, task };
        test_support::eventually("the feed ready", Duration::from_secs(20), || async {
            let r = reqwest::get(running.url("/readyz")).await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        running
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until this replica has read `n` events.
    pub async fn wait_read(&self, n: u64) {
        let line = format!("feed_events_read_total {n}");
        test_support::eventually(&format!("{n} events read"), Duration::from_secs(10), || async {
            self.metrics().await.lines().any(|l| l == line).then_some(())
        })
        .await;
    }

    /// Waits until this replica keeps `n` events (loaded or read).
    pub async fn wait_kept(&self, n: usize) {
        let line = format!("feed_history_events {n}");
        test_support::eventually(&format!("{n} events kept"), Duration::from_secs(10), || async {
            self.metrics().await.lines().any(|l| l == line).then_some(())
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.expect("metrics").text().await.expect("text")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(20), self.task).await;
        result.expect("stops in time").expect("not panicked").expect("clean stop");
    }
}

/// An event of `order` as a relay writes it; `event_id` decides its id (ids sort by time).
pub fn entry(event_id: Ulid, order: Ulid, seq: i64, tenant: &str) -> StreamEntry {
    entry_with(event_id, order, seq, tenant, "")
}

/// [`entry`] with `padding` in its payload (a large event).
pub fn entry_with(event_id: Ulid, order: Ulid, seq: i64, tenant: &str, padding: &str) -> StreamEntry {
    StreamEntry {
        event_id,
        event_type: if seq == 1 { "OrderCreated" } else { "OrderConfirmed" }.to_owned(),
        aggregate_type: "order".to_owned(),
        aggregate_id: order.to_string(),
        seq,
        occurred_at: Utc::now(),
        payload: serde_json::json!({ "order_id": order.to_string(), "padding": padding }).to_string(),
        traceparent: None,
        tracestate: None,
        tenant_id: TenantId::parse(tenant).expect("tenant"),
    }
}

pub async fn xadd(stream: &str, entry: &StreamEntry) {
    test_support::xadd(stream, &entry.to_fields()).await;
}

pub async fn delete_stream(stream: &str) {
    let mut conn = test_support::redis_connection().await;
    let _: i64 = redis::cmd("DEL").arg(stream).query_async(&mut conn).await.expect("DEL");
}

/// Where a test's events go: a Redis stream, or a JetStream stream (made at once, as the
/// relays would), under a name of the test's own.
pub struct Bus {
    pub stream: String,
    pub kind: broker::Kind,
    js: Option<broker::async_nats::jetstream::Context>,
}

impl Bus {
    pub async fn new(prefix: &str, kind: broker::Kind) -> Self {
        let stream = test_support::unique_name(prefix);
        let js = match kind {
            broker::Kind::Redis => None,
            broker::Kind::Nats => {
                let client = broker::async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
                let js = broker::jetstream::context(client);
                broker::jetstream::ensure_stream(&js, &self_layout(&stream)).await.expect("the stream");
                Some(js)
            }
        };
        Self { stream, kind, js }
    }

    pub fn config(&self) -> Config {
        let mut config = config(&self.stream);
        config.broker = broker::BrokerArgs { broker: self.kind, nats_url: test_support::nats_url() };
        config
    }

    /// Adds `entry`; on NATS without a `Nats-Msg-Id`, so that the same event added twice is
    /// stored twice (as outside JetStream's duplicate window).
    pub async fn xadd(&self, entry: &StreamEntry) {
        let Some(js) = &self.js else { return xadd(&self.stream, entry).await };
        let fields: Vec<(String, Vec<u8>)> =
            entry.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect();
        let (headers, body) = broker::entry::message_of_fields(&fields).expect("a message");
        let subject = self_layout(&self.stream).subject_of(&entry.aggregate_id).to_owned();
        js.publish_with_headers(subject, headers, body).await.expect("publish").await.expect("stored");
    }

    pub async fn delete(&self) {
        match &self.js {
            Some(js) => {
                let _ = js.delete_stream(&self_layout(&self.stream).stream).await;
            }
            None => delete_stream(&self.stream).await,
        }
    }
}

fn self_layout(stream: &str) -> broker::jetstream::Layout {
    broker::jetstream::Layout::new(&domain::Partitions::single(stream))
}
