//! The order API client against a real HTTP server: what it sends, how it reads answers, and
//! that a failed or timed-out request leaves the next one a fresh connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use loadgen::client::{Failure, OrderConnection};
use loadgen::mix::{Item, OrderBody};

#[derive(Default)]
struct Seen {
    creates: AtomicUsize,
}

async fn create(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    seen.creates.fetch_add(1, Ordering::SeqCst);
    assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
    let customer = body["customer_id"].as_str().unwrap_or_default().to_owned();
    (StatusCode::CREATED, Json(serde_json::json!({ "id": format!("{customer}/{key}"), "status": "PENDING" })))
}

async fn transition(Path((id, action)): Path<(String, String)>) -> StatusCode {
    match (id.as_str(), action.as_str()) {
        ("slow", _) => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK
        }
        (_, "confirm") => StatusCode::OK,
        _ => StatusCode::CONFLICT,
    }
}

async fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}/{action}", post(transition))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

fn body() -> OrderBody {
    OrderBody {
        customer_id: "c-7".to_owned(),
        items: vec![Item { sku: "SKU-1".to_owned(), quantity: 2, unit_price_cents: 100 }],
    }
}

#[tokio::test]
async fn creates_and_transitions_over_one_connection_and_reports_statuses() {
    let (url, seen) = server().await;
    let mut conn = OrderConnection::new(&url, Duration::from_secs(2)).expect("connection");
    assert_eq!(conn.create(&body(), Some("k-1")).await, Ok("c-7/k-1".to_owned()));
    assert_eq!(conn.create(&body(), None).await, Ok("c-7/none".to_owned()));
    assert_eq!(conn.transition("o-1", "confirm").await, Ok(()));
    assert_eq!(conn.transition("o-1", "cancel").await, Err(Failure("409".to_owned())));
    assert_eq!(seen.creates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_timed_out_request_is_a_timeout_and_the_next_one_reconnects() {
    let (url, _) = server().await;
    let mut conn = OrderConnection::new(&url, Duration::from_millis(300)).expect("connection");
    assert_eq!(conn.transition("slow", "confirm").await, Err(Failure("timeout".to_owned())));
    // The timed-out connection still has the slow request in flight; a new one is opened.
    assert_eq!(conn.create(&body(), None).await, Ok("c-7/none".to_owned()));
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let mut conn = OrderConnection::new(&url, Duration::from_secs(2)).expect("connection");
    assert_eq!(conn.create(&body(), None).await, Err(Failure("connect".to_owned())));
}

#[test]
fn only_plain_http_urls_are_accepted() {
    assert!(OrderConnection::new("https://example.com", Duration::from_secs(1)).is_err());
    assert!(OrderConnection::new("not a url", Duration::from_secs(1)).is_err());
    assert!(OrderConnection::new("http://127.0.0.1:8080/", Duration::from_secs(1)).is_ok());
}
