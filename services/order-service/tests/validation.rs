//! Every rule of the create body, content type and size, at its boundaries; and that no body
//! whatsoever yields a 5xx.

mod common;

use common::{count, problem, spawn_app, valid_body, TestAppWithDb};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

async fn expect_field(app: &TestAppWithDb, body: &Value, field: &str) {
    let p = problem(app.post_json("/orders", body).await, 422).await;
    assert_eq!(p["field"], field, "{body} → {p}");
    assert!(p["detail"].is_string());
}

async fn expect_created(app: &TestAppWithDb, body: &Value) {
    let r = app.post_json("/orders", body).await;
    assert_eq!(r.status(), 201, "{body}: {}", r.text().await.unwrap_or_default());
}

fn with_item(item: Value) -> Value {
    json!({"customer_id": "c-1", "items": [item]})
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    for raw in ["{", "", "nope", "{\"customer_id\": \"c\",}", "{} {}", "{\"customer_id\": \"c\"", "\u{0}"] {
        let p = problem(app.post_raw("/orders", Some("application/json"), raw).await, 400).await;
        assert!(p["detail"].as_str().unwrap().starts_with("malformed JSON"), "{raw:?} → {p}");
    }
    let invalid_utf8 = vec![b'{', b'"', 0xff, b'"', b':', b'1', b'}'];
    problem(app.post_raw("/orders", Some("application/json"), invalid_utf8).await, 400).await;
    assert_eq!(count(&app.db, "orders").await, 0);
}

#[tokio::test]
async fn unknown_missing_and_mistyped_fields_are_422_naming_the_field() {
    let app = spawn_app().await;
    let mut extra = valid_body();
    extra["coupon"] = json!("FREE");
    expect_field(&app, &extra, "coupon").await;
    expect_field(
        &app,
        &with_item(json!({"sku": "A", "quantity": 1, "unit_price_cents": 1, "color": "red"})),
        "items[0].color",
    )
    .await;

    expect_field(&app, &json!({"items": valid_body()["items"]}), "customer_id").await;
    expect_field(&app, &json!({"customer_id": "c"}), "items").await;
    expect_field(&app, &json!({"customer_id": null, "items": valid_body()["items"]}), "customer_id").await;
    expect_field(&app, &with_item(json!({"quantity": 1, "unit_price_cents": 1})), "items[0].sku").await;
    expect_field(&app, &with_item(json!({"sku": "A", "unit_price_cents": 1})), "items[0].quantity").await;
    expect_field(&app, &with_item(json!({"sku": "A", "quantity": 1})), "items[0].unit_price_cents").await;

    expect_field(&app, &json!({"customer_id": 5, "items": valid_body()["items"]}), "customer_id").await;
    expect_field(&app, &json!({"customer_id": "c", "items": {}}), "items").await;
    expect_field(&app, &json!({"customer_id": "c", "items": ["x"]}), "items[0]").await;
    expect_field(&app, &with_item(json!({"sku": 1, "quantity": 1, "unit_price_cents": 1})), "items[0].sku").await;
    expect_field(&app, &with_item(json!({"sku": "A", "quantity": "1", "unit_price_cents": 1})), "items[0].quantity")
        .await;
    expect_field(&app, &with_item(json!({"sku": "A", "quantity": 1.5, "unit_price_cents": 1})), "items[0].quantity")
        .await;
    expect_field(
        &app,
        &with_item(json!({"sku": "A", "quantity": 1, "unit_price_cents": 1e300})),
        "items[0].unit_price_cents",
    )
    .await;
    let huge =
        r#"{"customer_id": "c", "items": [{"sku": "A", "quantity": 99999999999999999999, "unit_price_cents": 1}]}"#;
    let p = problem(app.post_raw("/orders", Some("application/json"), huge).await, 422).await;
    assert_eq!(p["field"], "items[0].quantity");
    let dup =
        r#"{"customer_id": "a", "customer_id": "b", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}"#;
    let p = problem(app.post_raw("/orders", Some("application/json"), dup).await, 422).await;
    assert_eq!(p["field"], "customer_id");
    let dup = r#"{"customer_id": "a", "items": [{"sku": "A", "sku": "B", "quantity": 1, "unit_price_cents": 1}]}"#;
    let p = problem(app.post_raw("/orders", Some("application/json"), dup).await, 422).await;
    assert_eq!(p["field"], "items[0].sku");

    // The body must be an object.
    for body in [json!([]), json!(5), json!("x"), json!(null)] {
        let p = problem(app.post_json("/orders", &body).await, 422).await;
        assert!(p["detail"].is_string(), "{body} → {p}");
    }
    assert_eq!(count(&app.db, "orders").await, 0);
    assert_eq!(count(&app.db, "outbox").await, 0);

    // A number without a fractional part is an integer (as JSON Schema, and the OpenAPI
    // document, say), however it is written.
    expect_created(&app, &with_item(json!({"sku": "A", "quantity": 2.0, "unit_price_cents": 1e3}))).await;
}

#[tokio::test]
async fn each_rule_at_its_boundaries() {
    let app = spawn_app().await;
    let item = |sku: &str, q: i64, p: i64| json!({"sku": sku, "quantity": q, "unit_price_cents": p});

    // customer_id: 1..=64 characters (not bytes).
    expect_field(&app, &json!({"customer_id": "", "items": [item("A", 1, 1)]}), "customer_id").await;
    expect_created(&app, &json!({"customer_id": "c", "items": [item("A", 1, 1)]})).await;
    expect_created(&app, &json!({"customer_id": "é".repeat(64), "items": [item("A", 1, 1)]})).await;
    expect_field(&app, &json!({"customer_id": "x".repeat(65), "items": [item("A", 1, 1)]}), "customer_id").await;

    // items: 1..=100.
    expect_field(&app, &json!({"customer_id": "c", "items": []}), "items").await;
    let hundred: Vec<_> = (0..100).map(|i| item(&format!("SKU-{i}"), 1, 1)).collect();
    expect_created(&app, &json!({"customer_id": "c", "items": hundred})).await;
    let too_many: Vec<_> = (0..101).map(|_| item("A", 1, 1)).collect();
    expect_field(&app, &json!({"customer_id": "c", "items": too_many}), "items").await;

    // sku: [A-Z0-9][A-Z0-9-]{0,31}.
    for ok in ["A", "0", "A-", "SKU-1", &"Z".repeat(32)] {
        expect_created(&app, &with_item(item(ok, 1, 1))).await;
    }
    for bad in ["", "-A", "a", "SKU_1", "SKU 1", "É", &"Z".repeat(33)] {
        expect_field(&app, &with_item(item(bad, 1, 1)), "items[0].sku").await;
    }
    // The failing item is named by index.
    expect_field(&app, &json!({"customer_id": "c", "items": [item("A", 1, 1), item("bad", 1, 1)]}), "items[1].sku")
        .await;

    // quantity: 1..=1000.
    for q in [1, 1000] {
        expect_created(&app, &with_item(item("A", q, 1))).await;
    }
    for q in [0, -1, 1001, i64::MIN, i64::MAX] {
        expect_field(&app, &with_item(item("A", q, 1)), "items[0].quantity").await;
    }

    // unit_price_cents: 0..=1_000_000_000.
    for p in [0, 1_000_000_000] {
        expect_created(&app, &with_item(item("A", 1, p))).await;
    }
    for p in [-1, 1_000_000_001, i64::MAX] {
        expect_field(&app, &with_item(item("A", 1, p)), "items[0].unit_price_cents").await;
    }

    // The largest possible total (100 items × 1000 × 10^9) is stored exactly.
    let max: Vec<_> = (0..100).map(|_| item("A", 1000, 1_000_000_000)).collect();
    let r = app.post_json("/orders", &json!({"customer_id": "c", "items": max})).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["total_cents"], 100_000_000_000_000_i64);
}

#[tokio::test]
async fn content_type_must_be_json() {
    let app = spawn_app().await;
    let body = valid_body().to_string();
    for ct in
        [None, Some("text/plain"), Some("application/xml"), Some("application/jsonx"), Some("multipart/form-data")]
    {
        let p = problem(app.post_raw("/orders", ct, body.clone()).await, 415).await;
        assert_eq!(p["field"], "Content-Type", "{ct:?}");
    }
    for ct in
        ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"]
    {
        assert_eq!(app.post_raw("/orders", Some(ct), body.clone()).await.status(), 201, "{ct}");
    }
}

#[tokio::test]
async fn bodies_over_64_kib_are_413() {
    let app = spawn_app().await;
    let limit = order_service::MAX_BODY_BYTES;
    // Valid JSON padded with whitespace to an exact size.
    let sized = |n: usize| {
        let mut s = valid_body().to_string();
        s.push_str(&" ".repeat(n - s.len()));
        s
    };
    assert_eq!(app.post_raw("/orders", Some("application/json"), sized(limit)).await.status(), 201);
    let p = problem(app.post_raw("/orders", Some("application/json"), sized(limit + 1)).await, 413).await;
    assert!(p["detail"].as_str().unwrap().contains("65536"), "{p}");

    // Without Content-Length (chunked), the body is cut off at the limit all the same.
    let (status, head, body) = chunked_post(app.addr, "/orders", 20, 8 * 1024).await;
    assert_eq!(status, 413, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], 413);
    // A small chunked body is read normally.
    let (status, head, _) = chunked_post(app.addr, "/orders", 0, 0).await;
    assert_eq!(status, 201, "{head}");
    assert_eq!(count(&app.db, "orders").await, 2);
}

/// Sends a valid order followed by `chunks` chunks of `size` spaces with chunked transfer
/// encoding (no Content-Length) over a raw connection; returns status, head and body.
async fn chunked_post(addr: std::net::SocketAddr, path: &str, chunks: usize, size: usize) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("send request head");
    let first = valid_body().to_string();
    let mut payload = format!("{:x}\r\n{first}\r\n", first.len()).into_bytes();
    for _ in 0..chunks {
        payload.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        payload.extend(std::iter::repeat_n(b' ', size));
        payload.extend_from_slice(b"\r\n");
    }
    payload.extend_from_slice(b"0\r\n\r\n");
    // The server may answer and close before reading everything; that is the point.
    let _ = conn.write_all(&payload).await;
    let mut response = Vec::new();
    let _ = conn.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // The response body may itself be chunked: keep the JSON object only.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_owned(),
        _ => body.to_owned(),
    };
    (status, head.to_owned(), body)
}

#[tokio::test]
async fn idempotency_key_header_is_validated() {
    let app = spawn_app().await;
    for key in [String::new(), "k".repeat(256), "has space".into(), "tab\there".into()] {
        let r = app
            .client
            .post(app.url("/orders"))
            .header("idempotency-key", &key)
            .json(&valid_body())
            .send()
            .await
            .unwrap();
        let p = problem(r, 422).await;
        assert_eq!(p["field"], "Idempotency-Key", "{key:?}");
    }
    let r = app
        .client
        .post(app.url("/orders"))
        .header("idempotency-key", "k".repeat(255))
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .client
        .post(app.url("/orders"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r, 422).await["field"], "Idempotency-Key");
    assert_eq!(count(&app.db, "orders").await, 1);
}

/// Random mutations of valid bodies, random JSON values and random bytes: the answer is always
/// a 2xx or a 4xx problem, never a 5xx.
#[tokio::test]
async fn random_bodies_never_yield_a_server_error() {
    let app = spawn_app().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0bd3_5e7f);
    for i in 0..400 {
        let body = match i % 4 {
            0 => mutate_bytes(&mut rng, valid_body().to_string().into_bytes()),
            1 => serde_json::to_vec(&mutate_value(&mut rng, valid_body(), 0)).unwrap(),
            2 => serde_json::to_vec(&random_value(&mut rng, 0)).unwrap(),
            _ => (0..rng.random_range(0..64)).map(|_| rng.random::<u8>()).collect(),
        };
        let r = app.post_raw("/orders", Some("application/json"), body.clone()).await;
        let status = r.status();
        assert!(!status.is_server_error(), "{status} for {}", String::from_utf8_lossy(&body));
        if status != 201 {
            problem(r, status.as_u16()).await;
        }
    }
    let orders = count(&app.db, "orders").await;
    assert_eq!(count(&app.db, "outbox").await, orders, "every created order has its event");
}

fn mutate_bytes(rng: &mut impl Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..3) {
            0 => bytes[at] = rng.random(),
            1 => bytes.truncate(at),
            _ => bytes.insert(at, *b"{}[],:\"0-e.".get(rng.random_range(0..11)).unwrap_or(&b'x')),
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

fn random_value(rng: &mut impl Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>() >> rng.random_range(0..63)),
        3 => json!(rng.random::<f64>() * 1e6),
        4 => json!((0..rng.random_range(0..40)).map(|_| rng.random::<char>()).collect::<String>()),
        5 => Value::Array((0..rng.random_range(0..4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let keys = ["customer_id", "items", "sku", "quantity", "unit_price_cents", "x"];
            let mut map = serde_json::Map::new();
            for _ in 0..rng.random_range(0..4) {
                map.insert(keys[rng.random_range(0..keys.len())].to_owned(), random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// Replaces one node of `value` (possibly deep inside) with a random value.
fn mutate_value(rng: &mut impl Rng, mut value: Value, depth: u32) -> Value {
    let descend = rng.random_bool(0.7);
    match &mut value {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.random_range(0..map.len())).cloned().unwrap_or_default();
            if rng.random_bool(0.15) {
                map.remove(&key);
            } else if let Some(child) = map.remove(&key) {
                map.insert(key, mutate_value(rng, child, depth + 1));
            }
            value
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let at = rng.random_range(0..items.len());
            let child = items[at].take();
            items[at] = mutate_value(rng, child, depth + 1);
            value
        }
        _ => random_value(rng, depth),
    }
}
