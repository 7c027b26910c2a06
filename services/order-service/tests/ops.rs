//! /healthz, /readyz, /metrics, start-up without a database, graceful shutdown.

mod common;

use std::time::Duration;

use common::{config, problem, spawn_app, start, valid_body};
use test_support::{eventually, PrivatePostgres};

#[tokio::test]
async fn healthz_and_readyz_with_a_database() {
    let app = spawn_app().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn without_a_database_the_service_is_up_but_not_ready() {
    // Nothing listens on port 1.
    let app = start(config("postgres://postgres@127.0.0.1:1/orders")).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("postgres"));
    let r = app.post_json("/orders", &valid_body()).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let p = problem(r, 503).await;
    assert!(p["detail"].is_string());
    problem(app.get(&format!("/orders/{}", ulid::Ulid::new())).await, 503).await;
    app.stop().await;
}

/// The database goes away after start-up and comes back: requests get 503 meanwhile, never a
/// crash, and the service recovers by itself.
#[tokio::test]
async fn a_database_outage_is_503_and_recovers() {
    let mut pg = PrivatePostgres::start();
    let app = start(config(&test_support::with_database(&pg.url(), "postgres"))).await;
    app.wait_ready().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();

    pg.stop_immediate();
    problem(app.post_json("/orders", &valid_body()).await, 503).await;
    problem(app.post_empty(&format!("/orders/{id}/confirm")).await, 503).await;
    problem(app.get(&format!("/orders/{id}")).await, 503).await;
    assert_eq!(app.get("/readyz").await.status(), 503);
    assert_eq!(app.get("/healthz").await.status(), 200);

    pg.restart();
    app.wait_ready().await;
    let r = eventually("a create after the outage", Duration::from_secs(20), || async {
        let r = app.post_json("/orders", &valid_body()).await;
        (r.status() == 201).then_some(r)
    })
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(app.post_empty(&format!("/orders/{id}/confirm")).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_bounded_labels() {
    let app = spawn_app().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();
    assert_eq!(app.post_empty(&format!("/orders/{id}/confirm")).await.status(), 200);
    assert_eq!(app.get(&format!("/orders/{}", ulid::Ulid::new())).await.status(), 404);
    assert_eq!(app.get("/no/such/path").await.status(), 404);

    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let samples = parse_exposition(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| v)
            .sum::<f64>()
    };
    assert_eq!(
        value("http_server_requests_total", &[("method", "POST"), ("route", "/orders"), ("status", "201")]),
        1.0
    );
    assert_eq!(value("http_server_requests_total", &[("route", "/orders/{id}/confirm"), ("status", "200")]), 1.0);
    assert_eq!(value("http_server_requests_total", &[("route", "/orders/{id}"), ("status", "404")]), 1.0);
    assert_eq!(value("http_server_requests_total", &[("route", "unmatched"), ("status", "404")]), 1.0);
    assert_eq!(value("http_server_request_duration_seconds_count", &[("route", "/orders")]), 1.0);
    assert_eq!(value("orders_created_total", &[]), 1.0);
    assert_eq!(value("order_transitions_total", &[("to", "CONFIRMED")]), 1.0);
    // No label carries a concrete order id.
    assert!(!text.contains(&id));
}

/// Checks OpenMetrics text line by line; returns (name, labels, value) samples.
fn parse_exposition(text: &str) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                ["HELP ", "TYPE ", "UNIT ", "EOF"].iter().any(|p| comment.starts_with(p)),
                "unexpected comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), Default::default()),
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad metric name {name:?}");
        samples.push((name, labels, value));
    }
    samples
}

/// Shutdown waits for a request in flight: the request is held on the order's row lock by
/// the test, shutdown is requested, and the request still completes before the server exits.
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let app = spawn_app().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();

    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE").bind(&id).execute(&mut *blocker).await.unwrap();
    let in_flight = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url(&format!("/orders/{id}/confirm")));
        async move { client.post(url).send().await.map(|r| r.status().as_u16()) }
    });
    lock_waiters(&app, 1).await;

    app.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!app.server.is_finished(), "the server must wait for the in-flight request");
    blocker.commit().await.unwrap();

    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    let server = &app.app.server;
    eventually("the server to stop", Duration::from_secs(10), || async { server.is_finished().then_some(()) }).await;
    let order: String =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1").bind(&id).fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(order, "CONFIRMED");
    // New connections are refused once it has stopped.
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
}

/// Waits until no statement waits on a lock any more (the server cancelled it).
async fn lock_waiters_gone(db: &test_support::TestDatabase) {
    eventually("the abandoned statement to be cancelled", Duration::from_secs(5), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (waiting == 0).then_some(())
    })
    .await;
}

/// Requests held on row locks by the test: `n` of them waiting.
async fn lock_waiters(app: &common::TestAppWithDb, n: i64) {
    eventually("requests to wait on row locks", Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.db.pool)
        .await
        .ok()?;
        (waiting >= n).then_some(())
    })
    .await;
}

/// Writes that commit while the server drains still wake the relays: the first of two
/// confirms in flight carries the notification at its commit, the second commits first and is
/// left to the background notifier, which must outlive the drain.
#[tokio::test]
async fn writes_committed_while_shutting_down_still_wake_the_relays() {
    let app = spawn_app().await;
    let first = app.create_order().await["id"].as_str().unwrap().to_owned();
    let second = app.create_order().await["id"].as_str().unwrap().to_owned();
    let mut listener = sqlx::postgres::PgListener::connect(&app.db.url).await.unwrap();
    listener.listen(outbox::CHANNEL).await.unwrap();

    let confirm = |id: &str| {
        let (client, url) = (app.client.clone(), app.url(&format!("/orders/{id}/confirm")));
        tokio::spawn(async move { client.post(url).send().await.map(|r| r.status().as_u16()) })
    };
    let lock = |id: String| {
        let pool = app.db.pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await.unwrap();
            tx
        }
    };
    let (hold_first, hold_second) = (lock(first.clone()).await, lock(second.clone()).await);
    let carrier = confirm(&first);
    lock_waiters(&app, 1).await;
    let covered = confirm(&second);
    lock_waiters(&app, 2).await;

    app.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    hold_second.commit().await.unwrap();
    assert_eq!(covered.await.unwrap().unwrap(), 200);
    let sent = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(sent.is_ok(), "the write that committed during the drain was announced");
    assert_eq!(sent.unwrap().unwrap().payload(), "", "by the background notifier, not a carrier");

    hold_first.commit().await.unwrap();
    assert_eq!(carrier.await.unwrap().unwrap(), 200);
    let server = &app.app.server;
    eventually("the server to stop", Duration::from_secs(10), || async { server.is_finished().then_some(()) }).await;
}

/// Sends headers and a few bytes of a 100-byte body, then stalls.
async fn stalled_request(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head =
        "POST /orders HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"cus";
    conn.write_all(head.as_bytes()).await.expect("send partial request");
    conn
}

async fn read_all(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "the connection was answered or closed");
    String::from_utf8_lossy(&response).into_owned()
}

/// A client that stalls mid-body does not hold its request (and a connection) for long: the
/// body timeout answers 408 and closes the connection, and nothing is written.
#[tokio::test]
async fn a_stalled_request_times_out() {
    let db = test_support::fresh_database("orders_stall").await;
    let mut cfg = config(&db.url);
    cfg.http.body_timeout = Duration::from_millis(300);
    let app = start(cfg).await;
    app.wait_ready().await;

    let started = std::time::Instant::now();
    let mut conn = stalled_request(app.addr).await;
    let response = read_all(&mut conn).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(common::count(&db, "orders").await, 0);
    app.stop().await;
}

/// A request whose handling outlasts the request timeout (held on a row lock here) is
/// abandoned with 503, and its statement cancelled by the server once it sees the client's
/// connection closed (within `client_connection_check_interval`): it writes nothing, even
/// when the lock is released afterwards.
#[tokio::test]
async fn a_request_slower_than_the_request_timeout_is_503_and_writes_nothing() {
    let db = test_support::fresh_database("orders_slow").await;
    let mut cfg = config(&db.url);
    cfg.request_timeout_ms = 300;
    // Long enough that only the server's client check can end the statement in time.
    cfg.db_lock_timeout = Duration::from_secs(60);
    cfg.db_statement_timeout = Duration::from_secs(60);
    let app = start(cfg).await;
    app.wait_ready().await;
    let created = app.client.post(app.url("/orders")).json(&common::valid_body()).send().await.unwrap();
    let id = created.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE").bind(&id).execute(&mut *blocker).await.unwrap();
    let r = app.client.post(app.url(&format!("/orders/{id}/confirm"))).send().await.unwrap();
    common::problem(r, 503).await;
    lock_waiters_gone(&db).await;
    blocker.rollback().await.unwrap();
    let status: String =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1").bind(&id).fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "PENDING");
    assert_eq!(common::events(&db, &id).await.len(), 1, "no OrderConfirmed written");
    app.stop().await;
}

/// Shutdown is not held up by a stalled client: the server stops within the request timeout
/// plus its grace period.
#[tokio::test]
async fn a_stalled_client_does_not_block_shutdown() {
    let db = test_support::fresh_database("orders_stall").await;
    let mut cfg = config(&db.url);
    cfg.request_timeout_ms = 300;
    cfg.http.body_timeout = Duration::from_millis(300);
    let app = start(cfg).await;
    app.wait_ready().await;

    let mut conn = stalled_request(app.addr).await;
    app.shutdown.cancel();
    // Depending on whether the request had started, it is answered 408 or the idle connection
    // is closed; either way the server stops.
    let response = read_all(&mut conn).await;
    assert!(response.is_empty() || response.starts_with("HTTP/1.1 408"), "{response}");
    let server = &app.server;
    eventually("the server to stop", Duration::from_secs(10), || async { server.is_finished().then_some(()) }).await;
}
