//! `Idempotency-Key`: a retry returns the first response and writes nothing.

mod common;

use common::{count, events, problem, spawn_app, valid_body, TestAppWithDb};
use serde_json::{json, Value};

async fn create_with_key(app: &TestAppWithDb, key: &str, body: &Value) -> reqwest::Response {
    app.client.post(app.url("/orders")).header("idempotency-key", key).json(body).send().await.expect("request sent")
}

#[tokio::test]
async fn a_retry_returns_the_first_response_and_writes_nothing() {
    let app = spawn_app().await;
    let first = create_with_key(&app, "key-1", &valid_body()).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap();

    // The order moves on; a retry still gets the first response, not the current state.
    assert_eq!(app.post_empty(&format!("/orders/{id}/confirm")).await.status(), 200);
    for _ in 0..3 {
        let retry = create_with_key(&app, "key-1", &valid_body()).await;
        assert_eq!(retry.status(), 201);
        assert_eq!(retry.headers()["location"], location);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.json::<Value>().await.unwrap(), first);
    }
    // The same request written differently (key order, whitespace) is the same request.
    let reordered =
        r#"{ "items": [ {"unit_price_cents": 1250, "quantity": 2, "sku": "SKU-1"} ], "customer_id": "c-1" }"#;
    let r = app
        .client
        .post(app.url("/orders"))
        .header("idempotency-key", "key-1")
        .header("content-type", "application/json");
    let r = r.body(reordered).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id);

    assert_eq!(count(&app.db, "orders").await, 1);
    assert_eq!(events(&app.db, id).await, vec![(1, "OrderCreated".into()), (2, "OrderConfirmed".into())]);

    // Another key is another order.
    let other = create_with_key(&app, "key-2", &valid_body()).await;
    assert_eq!(other.status(), 201);
    assert_ne!(other.json::<Value>().await.unwrap()["id"], id);
    // Without a key, every request creates an order.
    app.create_order().await;
    app.create_order().await;
    assert_eq!(count(&app.db, "orders").await, 4);
}

#[tokio::test]
async fn the_same_key_with_a_different_body_is_422() {
    let app = spawn_app().await;
    assert_eq!(create_with_key(&app, "k", &valid_body()).await.status(), 201);
    let other = json!({"customer_id": "c-1", "items": [{"sku": "SKU-1", "quantity": 3, "unit_price_cents": 1250}]});
    let p = problem(create_with_key(&app, "k", &other).await, 422).await;
    assert_eq!(p["field"], "Idempotency-Key");
    assert_eq!(count(&app.db, "orders").await, 1);
    assert_eq!(count(&app.db, "outbox").await, 1);
}

#[tokio::test]
async fn an_invalid_body_does_not_use_up_the_key() {
    let app = spawn_app().await;
    let bad = json!({"customer_id": "", "items": []});
    problem(create_with_key(&app, "k", &bad).await, 422).await;
    assert_eq!(create_with_key(&app, "k", &valid_body()).await.status(), 201);
    assert_eq!(count(&app.db, "idempotency_keys").await, 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_one_order() {
    let app = spawn_app().await;
    let body = valid_body();
    let requests = (0..30).map(|_| create_with_key(&app, "same", &body));
    let responses = futures::future::join_all(requests).await;
    let mut ids = Vec::new();
    for r in responses {
        assert_eq!(r.status(), 201);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all requests got the same order");
    assert_eq!(count(&app.db, "orders").await, 1);
    assert_eq!(events(&app.db, &ids[0]).await, vec![(1, "OrderCreated".into())]);
}
