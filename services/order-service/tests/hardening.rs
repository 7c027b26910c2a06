//! Hostile and careless clients, with the shipped defaults: slow headers, made-up methods,
//! control characters, locks held past the lock timeout.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{config, problem, spawn_app, start, valid_body};
use rand::Rng;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SLOW_CONNECTIONS: usize = 2_000;

/// Opens a connection that sends a request line and then one header byte every 500 ms, never
/// finishing; returns when the server closes it (or after `give_up`), with how long it lasted.
async fn trickle(addr: std::net::SocketAddr, give_up: Duration) -> Option<Duration> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    let opened = Instant::now();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nx-slow: ").await.ok()?;
    let mut buf = [0_u8; 64];
    while opened.elapsed() < give_up {
        tokio::select! {
            read = conn.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return Some(opened.elapsed());
                }
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if conn.write_all(b"a").await.is_err() {
                    return Some(opened.elapsed());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_slow_connections_leave_normal_requests_answered_within_a_second() {
    // Server and clients share this process: 4 000 sockets.
    let _ = rlimit::increase_nofile_limit(16_384);
    let app = spawn_app().await;
    let header_timeout = order_service::Config::new("postgres://x/y", app.addr).http.header_timeout;
    let give_up = header_timeout + Duration::from_secs(5);
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW_CONNECTIONS {
        slow.spawn(trickle(app.addr, give_up));
    }
    // While they trickle, normal requests on fresh connections are answered at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for _ in 0..5 {
        let started = Instant::now();
        let created = client.post(app.url("/orders")).json(&valid_body()).send().await.expect("answered");
        assert_eq!(created.status(), 201);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "a normal request took {took:?} among {SLOW_CONNECTIONS} slow ones");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And every slow one is cut off once its headers have taken the header timeout.
    let mut lasted = Vec::new();
    while let Some(done) = slow.join_next().await {
        lasted.push(done.expect("trickle task").expect("the server closed the slow connection"));
    }
    assert_eq!(lasted.len(), SLOW_CONNECTIONS);
    let longest = lasted.iter().max().copied().unwrap_or_default();
    assert!(longest < header_timeout + Duration::from_secs(2), "a slow connection lasted {longest:?}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let closed = format!(r#"http_server_timed_out_connections_total{{reason="header"}} {SLOW_CONNECTIONS}"#);
    assert!(metrics.contains(&closed), "{metrics}");
}

/// Sends one request with `method` on a fresh connection; returns the status line.
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let request = format!("{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_owned()
}

fn request_series(metrics: &str) -> HashSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("http_server_requests_total{"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

#[tokio::test]
async fn five_hundred_made_up_methods_add_no_metric_series() {
    let app = spawn_app().await;
    // Every kind of answer an unknown method can get, once, with a standard-looking one.
    for path in ["/orders", "/orders/01J0000000000000000000000", "/nowhere"] {
        raw_request(app.addr, "BREW", path).await;
    }
    let before = request_series(&app.get("/metrics").await.text().await.unwrap());
    let mut rng = rand::rng();
    for _ in 0..500 {
        let method: String = (0..rng.random_range(3..12)).map(|_| rng.random_range(b'A'..=b'Z') as char).collect();
        // Made up: a real method (GET, PUT …) drawn by chance has series of its own.
        if ["GET", "PUT", "POST", "HEAD", "PATCH", "TRACE", "DELETE", "CONNECT", "OPTIONS"].contains(&method.as_str()) {
            continue;
        }
        let path = ["/orders", "/orders/01J0000000000000000000000", "/nowhere"][rng.random_range(0..3)];
        let status = raw_request(app.addr, &method, path).await;
        assert!(status.starts_with("HTTP/1.1 4"), "{method} {path}: {status}");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let after = request_series(&metrics);
    let added: Vec<&String> = after.difference(&before).filter(|s| !s.contains("/metrics")).collect();
    assert!(added.is_empty(), "new series: {added:?}");
    assert!(after.iter().any(|s| s.contains(r#"method="other""#)), "{metrics}");
}

#[tokio::test]
async fn customer_ids_with_nul_or_control_characters_are_422_naming_the_field() {
    let app = spawn_app().await;
    for bad in ["c\u{0}1", "c\n1", "\u{1b}[31mc", "c\u{7f}"] {
        let body = json!({"customer_id": bad, "items": valid_body()["items"]});
        let p = problem(app.post_json("/orders", &body).await, 422).await;
        assert_eq!(p["field"], "customer_id", "{bad:?}: {p}");
    }
    assert_eq!(common::count(&app.db, "orders").await, 0);
}

#[tokio::test]
async fn a_lock_held_past_the_lock_timeout_is_a_503_to_retry_not_a_500() {
    let db = test_support::fresh_database("orders_locked").await;
    let mut cfg = config(&db.url);
    cfg.db_lock_timeout = Duration::from_millis(300);
    let app = start(cfg).await;
    app.wait_ready().await;
    let created = app.client.post(app.url("/orders")).json(&valid_body()).send().await.unwrap();
    let id = created.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE").bind(&id).execute(&mut *blocker).await.unwrap();
    let started = Instant::now();
    let r = app.client.post(app.url(&format!("/orders/{id}/confirm"))).send().await.unwrap();
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    problem(r, 503).await;
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    blocker.rollback().await.unwrap();
    let status: String =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1").bind(&id).fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "PENDING");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"api_failures_total{class="transient"} 1"#), "{metrics}");
    app.stop().await;
}
