//! The whole pipeline as real processes: order-service and relay on a fresh orders database,
//! inventory-consumer on a fresh inventory database, all on one unique stream.

use std::collections::HashMap;
use std::time::Duration;

use test_support::TestDatabase;

use crate::ServiceProcess;

pub struct System {
    pub orders: TestDatabase,
    pub inventory: TestDatabase,
    pub stream: String,
    /// The Redis the test reads the stream from (an admin's URL).
    pub redis_url: String,
    /// The NATS server the events go through instead, when the system runs on NATS.
    pub nats_url: Option<String>,
    pub order_service: ServiceProcess,
    pub relay: ServiceProcess,
    pub consumer: ServiceProcess,
}

/// Extra environment: for every service, then per service.
#[derive(Default, Clone)]
pub struct Env {
    pub all: Vec<(String, String)>,
    pub order_service: Vec<(String, String)>,
    pub relay: Vec<(String, String)>,
    pub consumer: Vec<(String, String)>,
    /// Another Redis than the shared one, and the stream on it (an admin's URL; the relay's
    /// and the consumer's own may be set per service).
    pub redis: Option<(String, String)>,
    /// The events go through this NATS server (`BROKER=nats`) instead of Redis.
    pub nats: Option<String>,
}

impl Env {
    pub fn all(mut self, key: &str, value: impl Into<String>) -> Self {
        self.all.push((key.to_owned(), value.into()));
        self
    }

    /// The events through `broker`: on NATS, the shared server.
    pub fn on(mut self, broker: broker::Kind) -> Self {
        self.nats = (broker == broker::Kind::Nats).then(test_support::nats_url);
        self
    }
}

impl System {
    /// Starts the three services and waits until each reports ready.
    pub async fn start(env: Env) -> Self {
        let orders = test_support::fresh_database("sys_orders").await;
        let inventory = test_support::fresh_database("sys_inventory").await;
        Self::start_on(orders, inventory, env).await
    }

    /// [`System::start`] on databases the test made (and may have migrated) itself.
    pub async fn start_on(orders: TestDatabase, inventory: TestDatabase, env: Env) -> Self {
        let (redis, stream) =
            env.redis.clone().unwrap_or_else(|| (test_support::redis_url(), test_support::unique_name("sys-stream")));
        let with = |own: &[(String, String)], base: Vec<(String, String)>| {
            base.into_iter().chain(env.all.iter().cloned()).chain(own.iter().cloned()).collect::<Vec<_>>()
        };
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let on_nats = |own: &[(String, String)]| -> Vec<(String, String)> {
            let broker = env.nats.iter().flat_map(|url| [kv("BROKER", "nats"), kv("NATS_URL", url)]);
            broker.chain(own.iter().cloned()).collect()
        };
        let (relay_env, consumer_env) = (on_nats(&env.relay), on_nats(&env.consumer));
        let mut order_service =
            ServiceProcess::spawn("order-service", with(&env.order_service, vec![kv("DATABASE_URL", &orders.url)]));
        let mut relay = ServiceProcess::spawn(
            "relay",
            with(
                &relay_env,
                vec![kv("DATABASE_URL", &orders.url), kv("REDIS_URL", &redis), kv("REDIS_STREAM", &stream)],
            ),
        );
        let mut consumer = ServiceProcess::spawn(
            "inventory-consumer",
            with(
                &consumer_env,
                vec![
                    kv("DATABASE_URL", &inventory.url),
                    kv("REDIS_URL", &redis),
                    kv("REDIS_STREAM", &stream),
                    kv("CONSUMER_GROUP", &test_support::unique_name("inventory")),
                    kv("CONSUMER_NAME", "consumer-1"),
                ],
            ),
        );
        let ready = Duration::from_secs(60);
        order_service.wait_ready(ready).await;
        relay.wait_ready(ready).await;
        consumer.wait_ready(ready).await;
        let nats_url = env.nats.clone();
        Self { orders, inventory, stream, redis_url: redis, nats_url, order_service, relay, consumer }
    }

    /// The broker's URL, as the services' messaging spans name its server.
    pub fn broker_url(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(&self.redis_url)
    }

    /// The JetStream layout of the stream, on NATS.
    fn layout(&self) -> broker::jetstream::Layout {
        broker::jetstream::Layout::new(&domain::Partitions::single(&self.stream))
    }

    /// SIGTERM to all three, and each must exit successfully within 30 s.
    pub async fn stop(&mut self) {
        for process in [&self.order_service, &self.relay, &self.consumer] {
            process.terminate();
        }
        for process in [&mut self.order_service, &mut self.relay, &mut self.consumer] {
            let Some(status) = process.wait_exit(Duration::from_secs(30)).await else {
                process.kill().await;
                panic!("{} did not exit within 30 s of SIGTERM\n{}", process.name(), process.tail(50));
            };
            assert!(status.success(), "{} exited with {status} after SIGTERM\n{}", process.name(), process.tail(50));
        }
        if let Some(url) = &self.nats_url {
            // The shared server keeps what a test leaves behind.
            if let Ok(client) = broker::jetstream::connect(url.as_str(), "system-tests").await {
                let js = broker::jetstream::context(client);
                let layout = self.layout();
                for stream in [&layout.stream, &layout.dlq_stream] {
                    let _ = js.delete_stream(stream).await;
                }
            }
        }
    }
}

/// Requests the tests make. They panic with the response when it is not a success.
impl System {
    /// `PUT /inventory/{sku}` on the consumer.
    pub async fn set_stock(&self, sku: &str, on_hand: i64) {
        let consumer = &self.consumer;
        let resp = consumer
            .http()
            .put(consumer.url(&format!("/inventory/{sku}")))
            .json(&serde_json::json!({ "on_hand": on_hand }))
            .send()
            .await
            .expect("PUT /inventory");
        assert!(resp.status().is_success(), "PUT /inventory/{sku}: {}", resp.status());
    }

    /// Waits until the consumer shows `(on_hand, reserved)` for `sku`.
    pub async fn wait_for_stock(&self, sku: &str, expected: (i64, i64), timeout: Duration) {
        let consumer = &self.consumer;
        test_support::eventually(&format!("{sku} stock (on_hand, reserved) = {expected:?}"), timeout, || async {
            let resp = consumer.http().get(consumer.url(&format!("/inventory/{sku}"))).send().await.ok()?;
            let body: serde_json::Value = resp.json().await.ok()?;
            (body["on_hand"].as_i64()? == expected.0 && body["reserved"].as_i64()? == expected.1).then_some(())
        })
        .await;
    }

    /// `POST {path}` on order-service with a `traceparent` header; returns the JSON body.
    pub async fn post(&self, path: &str, body: Option<serde_json::Value>, traceparent: &str) -> serde_json::Value {
        let service = &self.order_service;
        let mut request = service.http().post(service.url(path)).header("traceparent", traceparent);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let resp = request.send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("JSON body");
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// Creates an order of `quantity` × `sku`; returns its id.
    pub async fn create_order(&self, sku: &str, quantity: u32, traceparent: &str) -> String {
        let body = serde_json::json!({
            "customer_id": "c-system",
            "items": [{ "sku": sku, "quantity": quantity, "unit_price_cents": 1250 }],
        });
        let order = self.post("/orders", Some(body), traceparent).await;
        order["id"].as_str().expect("order id in the response").to_owned()
    }

    /// The stream entries of `order_id`, as field maps, in stream order.
    pub async fn stream_entries(&self, order_id: &str) -> Vec<HashMap<String, String>> {
        if let Some(url) = &self.nats_url {
            return self.nats_entries(url, order_id).await;
        }
        let client = redis::Client::open(self.redis_url.as_str()).expect("Redis URL");
        let mut redis = client.get_multiplexed_async_connection().await.expect("connect to Redis");
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&self.stream).arg("-").arg("+").query_async(&mut redis).await.expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|e| e.map.keys().filter_map(|k| e.get::<String>(k).map(|v| (k.clone(), v))).collect::<HashMap<_, _>>())
            .filter(|fields| fields.get("aggregate_id").map(String::as_str) == Some(order_id))
            .collect()
    }
}

impl System {
    async fn nats_entries(&self, url: &str, order_id: &str) -> Vec<HashMap<String, String>> {
        let js =
            broker::jetstream::context(broker::jetstream::connect(url, "system-tests").await.expect("connect to NATS"));
        let stream = js.get_stream(&self.layout().stream).await.expect("the stream");
        let last = stream.get_info().await.expect("stream info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(m) = stream.get_raw_message(seq).await else { continue };
            let fields: HashMap<String, String> = broker::entry::fields_of(Some(&m.headers), &m.payload)
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect();
            if fields.get("aggregate_id").map(String::as_str) == Some(order_id) {
                out.push(fields);
            }
        }
        out
    }
}

/// `00-{trace}-{span}-{01|00}`.
pub fn traceparent(trace: &str, span: &str, sampled: bool) -> String {
    format!("00-{trace}-{span}-{}", if sampled { "01" } else { "00" })
}

/// A `traceparent` of a new, unsampled trace: for requests whose trace a test does not follow.
pub fn untraced() -> String {
    traceparent(&hex_id(16), &hex_id(8), false)
}

/// A random lower-case hex id of `bytes` bytes (16 for a trace id, 8 for a span id).
pub fn hex_id(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}
