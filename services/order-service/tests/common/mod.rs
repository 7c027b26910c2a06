//! Starts order-service on a free port over a database of its own.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::time::Duration;

use order_service::{Config, OrderService, Service, Shutdown, StartError};
use serde_json::{json, Value};
use test_support::{eventually, fresh_database, TestDatabase};

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub router: axum::Router,
    pub shutdown: Shutdown,
    pub server: tokio::task::JoinHandle<Result<(), StartError>>,
}

pub struct TestAppWithDb {
    pub app: TestApp,
    pub db: TestDatabase,
}

impl std::ops::Deref for TestAppWithDb {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// A fresh database and the service on it, ready (migrations applied).
pub async fn spawn_app() -> TestAppWithDb {
    let db = fresh_database("orders").await;
    let app = start(config(&db.url)).await;
    app.wait_ready().await;
    TestAppWithDb { app, db }
}

pub fn config(database_url: &str) -> Config {
    Config::new(database_url, "127.0.0.1:0".parse().expect("literal address"))
}

/// Starts the service without waiting for anything.
pub async fn start(config: Config) -> TestApp {
    let shutdown = Shutdown::new();
    let service = OrderService::bind(config).await.expect("service starts");
    let addr = service.local_addr();
    let router = service.router();
    let server = tokio::spawn(service.run(shutdown.clone()));
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("http client"),
        router,
        shutdown,
        server,
    }
}

pub fn valid_body() -> Value {
    json!({"customer_id": "c-1", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}]})
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn wait_ready(&self) {
        eventually("the service to report ready", Duration::from_secs(30), || async {
            let r = self.client.get(self.url("/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request sent")
    }

    /// POST with an exact body and content type (none when `None`).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send().await.expect("request sent")
    }

    pub async fn post_empty(&self, path: &str) -> reqwest::Response {
        self.client.post(self.url(path)).send().await.expect("request sent")
    }

    /// Creates an order from [`valid_body`]; returns its JSON.
    pub async fn create_order(&self) -> Value {
        let r = self.post_json("/orders", &valid_body()).await;
        assert_eq!(r.status(), 201);
        r.json().await.expect("order JSON")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.expect("server task").expect("server stopped cleanly");
    }
}

/// Asserts an RFC 9457 problem with `status`; returns its JSON.
pub async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status, "status");
    let ct = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["title"].is_string(), "{body}");
    body
}

/// Events of an order in the outbox (pending or published): (seq, event_type), by seq.
pub async fn events(db: &TestDatabase, order_id: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT seq, event_type FROM outbox WHERE aggregate_id = $1 \
         UNION ALL SELECT seq, event_type FROM outbox_published WHERE aggregate_id = $1 ORDER BY 1",
    )
    .bind(order_id)
    .fetch_all(&db.pool)
    .await
    .expect("read events")
}

pub async fn count(db: &TestDatabase, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&db.pool).await.expect("count rows")
}
