//! Fixtures: a fresh database and stream per test, event builders, a running consumer.

use std::net::SocketAddr;
use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{self, Layout};
use chrono::Utc;
use domain::{Event, EventPayload, NewOrder, OrderCancelled, OrderConfirmed, OrderCreated, OrderId};
use inventory_consumer::{Config, InventoryConsumer, Service, Shutdown};
use redis::aio::MultiplexedConnection;
use redis::Value;
use sqlx::PgPool;
use test_support::TestDatabase;
use ulid::Ulid;

pub struct Harness {
    pub db: TestDatabase,
    pub stream: String,
    pub group: String,
    pub redis: MultiplexedConnection,
    /// The broker the events go through (`BROKER`), and the NATS client when it is NATS.
    pub broker: broker::Kind,
    nats: Option<async_nats::Client>,
}

impl Harness {
    /// A harness on Redis.
    pub async fn new(prefix: &str) -> Self {
        Self::on(prefix, broker::Kind::Redis).await
    }

    /// A harness on `broker`: on NATS its stream (one partition) is made at once.
    pub async fn on(prefix: &str, broker: broker::Kind) -> Self {
        let db = test_support::fresh_database(prefix).await;
        inventory_consumer::MIGRATOR.run(&db.pool).await.expect("migrate");
        let stream = test_support::unique_name("orders");
        let nats = match broker {
            broker::Kind::Redis => None,
            broker::Kind::Nats => {
                let client = async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
                let js = jetstream::context(client.clone());
                jetstream::ensure_stream(&js, &Self::layout_of(&stream)).await.expect("the stream");
                Some(client)
            }
        };
        Self {
            db,
            stream,
            group: test_support::unique_name("inventory"),
            redis: test_support::redis_connection().await,
            broker,
            nats,
        }
    }

    fn layout_of(stream: &str) -> Layout {
        Layout::new(&domain::Partitions::single(stream))
    }

    /// The JetStream context, on NATS.
    fn js(&self) -> Option<async_nats::jetstream::Context> {
        self.nats.clone().map(jetstream::context)
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    pub fn config(&self, name: &str) -> Config {
        Config {
            database_url: self.db.url.clone(),
            database_migration_url: None,
            database_runtime_role: "inventory_app".parse().expect("role"),
            database_consumer_role: "inventory_consumer".parse().expect("role"),
            redis_url: test_support::redis_url(),
            topology: Default::default(),
            broker: broker::BrokerArgs { broker: self.broker, nats_url: test_support::nats_url() },
            redis_stream: self.stream.clone(),
            consumer_group: self.group.clone(),
            consumer_name: name.to_owned(),
            http_addr: "127.0.0.1:0".parse().expect("address"),
            // /metrics on the API listener (the tests read it there).
            admin_addr: "127.0.0.1:0".parse().expect("address"),
            claim_min_idle: Duration::from_secs(30),
            max_deliveries: 5,
            dlq_max_len: 100_000,
            dedupe_retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
            parked_warn_after: Duration::from_secs(300),
            departed_after: Duration::from_secs(3600),
            batch_size: 256,
            block: Duration::from_millis(100),
            database_max_connections: 4,
            upkeep_interval: Duration::from_secs(5),
            db_statement_timeout: None,
            db_lock_timeout: None,
            db_idle_in_transaction_timeout: None,
            http: service_kit::http::HttpSettings::default(),
            auth: service_kit::auth::AuthSettings::default(),
            log_format: telemetry::LogFormat::Text,
        }
    }

    /// The config of a replica whose Redis user may do everything but `XACK`: it commits the
    /// batches it reads and can never acknowledge them, as if each time it died between its
    /// commit and its XACK.
    pub async fn config_without_ack(&self, name: &str) -> (Config, AclUser) {
        self.config_denied(name, &["-xack"]).await
    }

    /// The config of a replica whose Redis user may do everything but what `denied` (ACL
    /// rules such as `-xack` or `-@scripting`) takes away.
    pub async fn config_denied(&self, name: &str, denied: &[&str]) -> (Config, AclUser) {
        let user = test_support::unique_name("acl");
        let mut conn = self.redis.clone();
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg(&["on", "nopass", "~*", "&*", "+@all"])
            .arg(denied)
            .query_async::<()>(&mut conn)
            .await
            .expect("ACL SETUSER");
        let url = test_support::redis_url();
        // The host and port, without the test's own credentials (compose's admin user, say).
        let rest = url.strip_prefix("redis://").expect("TEST_REDIS_URL is redis://…");
        let address = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let mut config = self.config(name);
        config.redis_url = format!("redis://{user}:any@{address}");
        (config, AclUser { name: user })
    }

    pub async fn start(&self, name: &str) -> Running {
        Running::start(self.config(name)).await
    }

    pub async fn set_stock(&self, sku: &str, on_hand: i64) {
        sqlx::query(
            "INSERT INTO inventory (sku, on_hand) VALUES ($1, $2) ON CONFLICT (tenant_id, sku) DO UPDATE SET on_hand = $2",
        )
        .bind(sku)
        .bind(on_hand)
        .execute(self.pool())
        .await
        .expect("seed stock");
    }

    /// (on_hand, reserved)
    pub async fn stock(&self, sku: &str) -> (i64, i64) {
        sqlx::query_as("SELECT on_hand, reserved FROM inventory WHERE sku = $1")
            .bind(sku)
            .fetch_one(self.pool())
            .await
            .expect("stock row")
    }

    /// (on_hand, reserved) of `tenant`'s `sku`, if it has one.
    pub async fn stock_of(&self, tenant: &str, sku: &str) -> Option<(i64, i64)> {
        sqlx::query_as("SELECT on_hand, reserved FROM inventory WHERE tenant_id = $1 AND sku = $2")
            .bind(tenant)
            .bind(sku)
            .fetch_optional(self.pool())
            .await
            .expect("stock row")
    }

    pub async fn reservation(&self, order: OrderId) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM order_reservations WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_optional(self.pool())
            .await
            .expect("reservation")
    }

    pub async fn checkpoint(&self, order: OrderId) -> i64 {
        sqlx::query_scalar("SELECT last_seq FROM aggregate_checkpoints WHERE aggregate_id = $1")
            .bind(order.to_string())
            .fetch_optional(self.pool())
            .await
            .expect("checkpoint")
            .unwrap_or(0)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.pool()).await.expect("count")
    }

    pub async fn xadd(&self, event: &Event) -> String {
        let fields: Vec<(String, Vec<u8>)> =
            event.to_entry().to_fields().into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect();
        self.xadd_fields(&self.stream, &fields).await
    }

    /// Adds an entry of `fields` to the stream `key`; on NATS, a message to the subject `key`
    /// without a `Nats-Msg-Id` (each is stored, as a copy outside the duplicate window is).
    pub async fn xadd_fields(&self, key: &str, fields: &[(String, Vec<u8>)]) -> String {
        if let Some(js) = self.js() {
            let (headers, body) = broker::entry::message_of_fields(fields).expect("fields a message can carry");
            let ack = js.publish_with_headers(key.to_owned(), headers, body).await.expect("publish");
            return ack.await.expect("stored").sequence.to_string();
        }
        let mut conn = self.redis.clone();
        broker::redis::group::add(&mut conn, key, fields).await.expect("XADD")
    }

    /// Group info field (`pending`, `lag`, `last-delivered-id`, ...) as text.
    pub async fn group_info(&self, field: &str) -> Option<String> {
        let mut conn = self.redis.clone();
        let reply: Value = redis::cmd("XINFO").arg("GROUPS").arg(&self.stream).query_async(&mut conn).await.ok()?;
        let Value::Array(groups) = reply else { return None };
        for g in groups {
            let Value::Array(flat) = g else { continue };
            let pairs: Vec<(String, String)> = flat
                .chunks(2)
                .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?).unwrap_or_default())))
                .collect();
            if pairs.iter().any(|(k, v)| k == "name" && *v == self.group) {
                return pairs.into_iter().find(|(k, _)| k == field).map(|(_, v)| v);
            }
        }
        None
    }

    /// Waits until `n` events were applied (committed; acknowledged or not).
    pub async fn applied(&self, n: i64) {
        test_support::eventually("events applied", Duration::from_secs(30), || async {
            (self.count("SELECT count(*) FROM processed_messages").await == n).then_some(())
        })
        .await
    }

    /// Waits until every entry added so far was delivered and acknowledged.
    pub async fn drained(&self) {
        if let Some(js) = self.js() {
            let layout = Self::layout_of(&self.stream);
            let durable = layout.durable(&self.group, 0);
            test_support::eventually("group drained", Duration::from_secs(60), || async {
                let mut stream = js.get_stream(&layout.stream).await.ok()?;
                let last = stream.info().await.ok()?.state.last_sequence;
                let info = stream.consumer_info(&durable).await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= last)
                    .then_some(())
            })
            .await;
            return;
        }
        let mut conn = self.redis.clone();
        let total: u64 = redis::cmd("XLEN").arg(&self.stream).query_async(&mut conn).await.expect("XLEN");
        test_support::eventually("group drained", Duration::from_secs(60), || async {
            let lag = self.group_info("lag").await?;
            let pending = self.group_info("pending").await?;
            let read = self.group_info("entries-read").await?;
            (lag == "0" && pending == "0" && read.parse::<u64>().ok()? >= total).then_some(())
        })
        .await
    }

    /// The entries of the stream `key` (on NATS: of the events' subject, or of the dead
    /// letters' stream for `<stream>.dlq`, a letter's JSON flattened into fields).
    pub async fn entries(&self, key: &str) -> Vec<(String, Vec<(String, String)>)> {
        if let Some(js) = self.js() {
            return self.nats_entries(&js, key).await;
        }
        let mut conn = self.redis.clone();
        let reply: Value =
            redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(&mut conn).await.expect("XRANGE");
        let Value::Array(entries) = reply else { return Vec::new() };
        entries
            .into_iter()
            .filter_map(|e| {
                let Value::Array(parts) = e else { return None };
                let id = text(parts.first()?)?;
                let Value::Array(flat) = parts.get(1)? else { return None };
                let fields = flat.chunks(2).filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?))).collect();
                Some((id, fields))
            })
            .collect()
    }
}

impl Harness {
    async fn nats_entries(
        &self,
        js: &async_nats::jetstream::Context,
        key: &str,
    ) -> Vec<(String, Vec<(String, String)>)> {
        let layout = Self::layout_of(&self.stream);
        let dlq = key == layout.dlq_subject;
        let name = if dlq { &layout.dlq_stream } else { &layout.stream };
        let Ok(stream) = js.get_stream(name).await else { return Vec::new() };
        let last = stream.get_info().await.map(|i| i.state.last_sequence).unwrap_or(0);
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(m) = stream.get_raw_message(seq).await else { continue };
            let fields: Vec<(String, String)> = if dlq {
                let letter: serde_json::Value = serde_json::from_slice(&m.payload).expect("a letter is JSON");
                let mut fields = vec![
                    ("reason".to_owned(), letter["reason"].as_str().unwrap_or_default().to_owned()),
                    (
                        "original_entry_id".to_owned(),
                        letter["original_entry_id"].as_str().unwrap_or_default().to_owned(),
                    ),
                ];
                for pair in letter["fields"].as_array().into_iter().flatten() {
                    fields.push((
                        pair[0].as_str().unwrap_or_default().to_owned(),
                        pair[1].as_str().unwrap_or_default().to_owned(),
                    ));
                }
                fields
            } else {
                broker::entry::fields_of(Some(&m.headers), &m.payload)
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect()
            };
            out.push((seq.to_string(), fields));
        }
        out
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Nil => Some(String::new()),
        _ => None,
    }
}

/// A Redis user with commands taken away ([`Harness::config_denied`]), deleted when dropped.
pub struct AclUser {
    name: String,
}

impl AclUser {
    /// Deletes the user: Redis closes its connections and it cannot connect again, so its
    /// replica is cut off for good with what it has applied still unacknowledged.
    pub fn cut(self) {}
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let deleted = redis::Client::open(test_support::redis_url())
            .and_then(|client| client.get_connection())
            .and_then(|mut conn| redis::cmd("ACL").arg("DELUSER").arg(&self.name).query::<()>(&mut conn));
        if let Err(e) = deleted {
            eprintln!("ACL DELUSER {}: {e}", self.name);
        }
    }
}

pub struct Running {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), inventory_consumer::StartError>>,
}

impl Running {
    pub async fn start(config: Config) -> Self {
        let service = InventoryConsumer::bind(config).await.expect("bind");
        let addr = service.local_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(service.run(shutdown.clone()));
        Self { addr, shutdown, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The value of the unlabelled metric `name`, as text.
    pub async fn metric(&self, name: &str) -> String {
        let text = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        let prefix = format!("{name} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name} in\n{text}")).to_owned()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("clean stop");
    }
}

pub fn created(order: OrderId, items: &[(&str, i64)]) -> Event {
    let items: Vec<_> = items.iter().map(|(s, q)| (s.to_string(), *q, 100)).collect();
    let new = NewOrder::parse("c-1", &items).expect("valid order");
    let total_cents = new.total_cents();
    let payload = EventPayload::OrderCreated(OrderCreated {
        order_id: order,
        customer_id: new.customer_id,
        items: new.items,
        total_cents,
    });
    event(order, 1, payload)
}

/// `event`, of `tenant`.
pub fn of_tenant(mut event: Event, tenant: &str) -> Event {
    event.tenant_id = domain::TenantId::parse(tenant).expect("tenant");
    event
}

pub fn confirmed(order: OrderId, seq: i64) -> Event {
    event(order, seq, EventPayload::OrderConfirmed(OrderConfirmed { order_id: order }))
}

pub fn cancelled(order: OrderId, seq: i64) -> Event {
    event(order, seq, EventPayload::OrderCancelled(OrderCancelled { order_id: order }))
}

fn event(order: OrderId, seq: i64, payload: EventPayload) -> Event {
    Event {
        event_id: Ulid::new(),
        aggregate_id: order,
        seq,
        occurred_at: Utc::now(),
        payload,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        tracestate: None,
        tenant_id: domain::TenantId::default_tenant(),
    }
}
