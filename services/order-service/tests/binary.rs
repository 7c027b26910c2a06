//! The `order-service` binary: `--help`, configuration from the environment, the bound address
//! printed at start, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_order-service");

#[test]
fn help_lists_every_setting() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--database-url",
        "DATABASE_URL",
        "HTTP_ADDR",
        "LOG_FORMAT",
        "0.0.0.0:8080",
        "ADMIN_ADDR",
        "0.0.0.0:9080",
        "REQUEST_TIMEOUT_MS",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn database_url_is_required() {
    let out = Command::new(BIN).env_remove("DATABASE_URL").output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL")
            || String::from_utf8_lossy(&out.stderr).contains("database-url")
    );
}

/// The API and, apart, the admin listener (`/metrics` only there, as with the defaults: 8080
/// and 9080); both stop on SIGTERM.
#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm() {
    let db = test_support::fresh_database("orders_bin").await;
    // A free port of its own: "127.0.0.1:0" again would be the API's own listener.
    let admin_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut child = Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("ADMIN_ADDR", &admin_addr)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let message = json["message"].as_str().unwrap_or_default().to_owned();
            if message == "listening" || message.starts_with("admin listening") {
                let _ = tx.send((message, json["addr"].as_str().unwrap_or_default().to_owned()));
            }
        }
    });
    let mut addrs = std::collections::HashMap::new();
    while addrs.len() < 2 {
        let (message, addr) = rx.recv_timeout(Duration::from_secs(30)).expect("both bound addresses are logged");
        addrs.insert(if message == "listening" { "api" } else { "admin" }, addr);
    }
    let (addr, admin) = (addrs["api"].clone(), addrs["admin"].clone());
    assert_ne!(addr, admin);
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    test_support::eventually("ready", Duration::from_secs(30), || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let body = serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]});
    assert_eq!(client.post(format!("{base}/orders")).json(&body).send().await.unwrap().status(), 201);
    // `/metrics` is the admin listener's alone; both answer health checks.
    let metrics = client.get(format!("http://{admin}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("orders_created_total"), "admin /metrics lacks the orders counter");
    assert_eq!(client.get(format!("{base}/metrics")).send().await.unwrap().status(), 404);
    assert_eq!(client.get(format!("http://{admin}/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("http://{admin}/orders/x")).send().await.unwrap().status(), 404);

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = test_support::eventually("the process to exit", Duration::from_secs(15), || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
}
