//! `PUT`/`GET /inventory/{sku}` and the ops endpoints.

use domain::OrderId;
use serde_json::{json, Value};

use crate::common::{created, Harness};

async fn put(client: &reqwest::Client, url: &str, body: &str, content_type: &str) -> (u16, Value) {
    let res = client.put(url).header("content-type", content_type).body(body.to_owned()).send().await.unwrap();
    let status = res.status().as_u16();
    let is_problem = res.headers().get("content-type").is_some_and(|v| v == "application/problem+json");
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert!(is_problem, "{status} {body}");
    }
    (status, body)
}

#[tokio::test]
async fn stock_can_be_set_and_read_and_bad_input_is_refused_clearly() {
    let h = Harness::new("http").await;
    let running = h.start("c1").await;
    let client = reqwest::Client::new();
    let url = running.url("/inventory/SKU-7");

    assert_eq!(client.get(&url).send().await.unwrap().status(), 404);
    let (status, body) = put(&client, &url, r#"{"on_hand": 12}"#, "application/json").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"sku": "SKU-7", "on_hand": 12, "reserved": 0, "available": 12}));

    // Reservations are kept when stock is set, and stock cannot go below them.
    h.xadd(&created(OrderId::new(), &[("SKU-7", 5)])).await;
    h.drained().await;
    let (status, body) = put(&client, &url, r#"{"on_hand": 20}"#, "application/json").await;
    assert_eq!((status, body["reserved"].clone(), body["available"].clone()), (200, json!(5), json!(15)));
    let (status, body) = put(&client, &url, r#"{"on_hand": 4}"#, "application/json").await;
    assert_eq!((status, body["field"].as_str()), (409, Some("on_hand")));
    let got: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, json!({"sku": "SKU-7", "on_hand": 20, "reserved": 5, "available": 15}));

    for bad in [r#"{"on_hand": -1}"#, r#"{"on_hand": 1.5}"#, r#"{"on_hand": "3"}"#] {
        let (status, body) = put(&client, &url, bad, "application/json").await;
        assert_eq!((status, body["field"].as_str()), (422, Some("on_hand")), "{bad}");
    }
    let (status, _) = put(&client, &url, r#"{"on_hand": 1, "extra": 2}"#, "application/json").await;
    assert_eq!(status, 422);
    let (status, _) = put(&client, &url, r#"{}"#, "application/json").await;
    assert_eq!(status, 422);
    let (status, _) = put(&client, &url, r#"{"on_hand": "#, "application/json").await;
    assert_eq!(status, 400);
    let (status, _) = put(&client, &url, r#"{"on_hand": 1}"#, "text/plain").await;
    assert_eq!(status, 415);
    let huge = format!(r#"{{"on_hand": 1, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let (status, _) = put(&client, &url, &huge, "application/json").await;
    assert_eq!(status, 413);
    let (status, body) =
        put(&client, &running.url("/inventory/bad%20sku"), r#"{"on_hand": 1}"#, "application/json").await;
    assert_eq!((status, body["field"].as_str()), (422, Some("sku")));
    assert_eq!(client.get(running.url("/inventory/lower-case")).send().await.unwrap().status(), 422);

    assert_eq!(client.get(running.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(running.url("/readyz")).send().await.unwrap().status(), 200);
    let metrics = client.get(running.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "consumer_events_total",
        "consumer_end_to_end_latency_seconds",
        "consumer_pending_entries",
        "consumer_batch_size",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    running.stop().await;
}

#[tokio::test]
async fn stock_is_bounded_and_a_stale_if_match_write_is_refused_with_412() {
    let h = Harness::new("etag").await;
    let running = h.start("c1").await;
    let client = reqwest::Client::new();
    let url = running.url("/inventory/SKU-9");
    let put_if = |header: &'static str, value: String, body: &'static str| {
        client.put(&url).header("content-type", "application/json").header(header, value).body(body).send()
    };
    let etag = |r: &reqwest::Response| r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);

    // Bounded: no later reservation, confirmation or restock can overflow.
    let max = inventory_consumer::http::MAX_ON_HAND;
    let (status, body) = put(&client, &url, &format!(r#"{{"on_hand": {}}}"#, max + 1), "application/json").await;
    assert_eq!((status, body["field"].as_str()), (422, Some("on_hand")), "{body}");
    let (status, _) = put(&client, &url, &format!(r#"{{"on_hand": {}}}"#, i64::MAX), "application/json").await;
    assert_eq!(status, 422);

    // Create only if absent; a second create-if-absent is refused.
    let created_once = put_if("if-none-match", "*".to_owned(), r#"{"on_hand": 10}"#).await.unwrap();
    assert_eq!(created_once.status(), 200);
    let first = etag(&created_once).expect("an ETag");
    assert_eq!(put_if("if-none-match", "*".to_owned(), r#"{"on_hand": 99}"#).await.unwrap().status(), 412);
    let read = client.get(&url).send().await.unwrap();
    assert_eq!(etag(&read).as_deref(), Some(first.as_str()));

    // A reservation changes the row, so a write based on the earlier read is stale.
    h.xadd(&created(OrderId::new(), &[("SKU-9", 3)])).await;
    h.drained().await;
    let stale = put_if("if-match", first.clone(), r#"{"on_hand": 50}"#).await.unwrap();
    assert_eq!(stale.status(), 412);
    let problem: Value = stale.json().await.unwrap();
    assert_eq!((problem["status"].as_u64(), problem["field"].as_str()), (Some(412), Some("If-Match")));
    let current = etag(&client.get(&url).send().await.unwrap()).expect("an ETag");
    assert_ne!(current, first);
    let fresh = put_if("if-match", current.clone(), r#"{"on_hand": 50}"#).await.unwrap();
    assert_eq!(fresh.status(), 200);
    let after = etag(&fresh).expect("an ETag");
    assert_ne!(after, current);
    let got: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, json!({"sku": "SKU-9", "on_hand": 50, "reserved": 3, "available": 47}));
    // `*` matches any version of an existing row, never a missing one.
    assert_eq!(put_if("if-match", "*".to_owned(), r#"{"on_hand": 40}"#).await.unwrap().status(), 200);
    let missing = running.url("/inventory/SKU-NONE");
    let absent = client
        .put(&missing)
        .header("content-type", "application/json")
        .header("if-match", "*")
        .body(r#"{"on_hand": 1}"#);
    assert_eq!(absent.send().await.unwrap().status(), 412);
    assert_eq!(client.get(&missing).send().await.unwrap().status(), 404, "If-Match never creates");
    running.stop().await;
}

/// With `AUTH_JWT_SECRET` set, `GET` needs `inventory:read` and `PUT` `inventory:write`: no,
/// forged, expired or unscoped tokens get 401/403 problem+json with the Bearer challenge, and
/// change nothing.
#[tokio::test]
async fn the_inventory_routes_need_a_token_with_their_scope() {
    use domain::TenantId;
    use service_kit::auth::{mint, SigningKey};

    const SECRET: &str = "inventory-test-secret-of-32-bytes-plus";
    let h = Harness::new("http-auth").await;
    let mut config = h.config("c1");
    config.auth.auth_jwt_secret = Some(SECRET.to_owned());
    let running = crate::common::Running::start(config).await;
    let client = reqwest::Client::new();
    let url = running.url("/inventory/SKU-A");
    let tenant = TenantId::parse("t-a").unwrap();
    let now = chrono::Utc::now().timestamp().unsigned_abs();
    let token = |key: &str, scope: &str, exp: u64| mint(SigningKey::Secret(key), &tenant, scope, exp).unwrap();
    let all = "orders:read orders:write inventory:read inventory:write admin";
    let good = token(SECRET, all, now + 600);
    let r = client.put(&url).bearer_auth(&good).json(&json!({"on_hand": 3})).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let forged = token("another-secret-that-is-32-bytes-long!", all, now + 600);
    let expired = token(SECRET, all, now - 3600);
    for (method, scope) in [("GET", "inventory:read"), ("PUT", "inventory:write")] {
        let send = |bearer: Option<String>| {
            let req = if method == "GET" { client.get(&url) } else { client.put(&url).json(&json!({"on_hand": 99})) };
            let req = match bearer {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            async move { req.send().await.unwrap() }
        };
        let unscoped = token(SECRET, &all.split(' ').filter(|s| *s != scope).collect::<Vec<_>>().join(" "), now + 600);
        for (bearer, status, challenge) in [
            (None, 401, "Bearer"),
            (Some(forged.clone()), 401, "Bearer error=\"invalid_token\""),
            (Some(expired.clone()), 401, "Bearer error=\"invalid_token\""),
            (Some(unscoped), 403, "Bearer error=\"insufficient_scope\""),
        ] {
            let r = send(bearer).await;
            assert_eq!(r.status(), status, "{method}");
            let header = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
            assert!(header.starts_with(challenge), "{method}: {header}");
            assert_eq!(r.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
        }
    }
    let got: Value = client.get(&url).bearer_auth(&good).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["on_hand"], 3, "no refused PUT changed the stock");
    running.stop().await;
}

/// With an admin listener apart (as the defaults have it: 8081 and 9081), `/metrics` is served
/// there and not on the API's listener; both answer the health checks.
#[tokio::test]
async fn metrics_are_served_on_the_admin_listener_only() {
    let h = Harness::new("admin").await;
    let mut config = h.config("c1");
    // A free port of its own: "127.0.0.1:0" again would be the API's own listener.
    config.admin_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let service = inventory_consumer::InventoryConsumer::bind(config).await.expect("bind");
    let api = inventory_consumer::Service::local_addr(&service);
    let admin = service.admin_addr().expect("an admin listener apart");
    let shutdown = inventory_consumer::Shutdown::new();
    let task = tokio::spawn(inventory_consumer::Service::run(service, shutdown.clone()));
    let client = reqwest::Client::new();
    test_support::eventually("ready", std::time::Duration::from_secs(30), || async {
        let r = client.get(format!("http://{admin}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let metrics = client.get(format!("http://{admin}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("consumer_redelivered_total"));
    assert_eq!(client.get(format!("http://{api}/metrics")).send().await.unwrap().status(), 404);
    assert_eq!(client.get(format!("http://{api}/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("http://{admin}/inventory/SKU-1")).send().await.unwrap().status(), 404);
    shutdown.cancel();
    task.await.expect("task").expect("clean stop");
}
