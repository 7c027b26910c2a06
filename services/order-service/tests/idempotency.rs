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

async fn id_of(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.expect("a JSON body")["id"].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn a_key_past_its_ttl_is_removed_and_its_reuse_creates_a_new_order() {
    let db = test_support::fresh_database("orders_key_ttl").await;
    let mut cfg = common::config(&db.url);
    cfg.idempotency_key_ttl = std::time::Duration::from_secs(1);
    let app = TestAppWithDb { app: common::start(cfg).await, db };
    app.wait_ready().await;
    let first = id_of(create_with_key(&app, "short-lived", &valid_body()).await).await;
    let retry = create_with_key(&app, "short-lived", &valid_body()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(retry).await, first);
    for i in 0..50 {
        id_of(create_with_key(&app, &format!("k-{i}"), &valid_body()).await).await;
    }
    test_support::eventually("expired keys removed", std::time::Duration::from_secs(10), || async {
        (count(&app.db, "idempotency_keys").await == 0).then_some(())
    })
    .await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("idempotency_keys_expired_total 51"), "{metrics}");
    let again = id_of(create_with_key(&app, "short-lived", &valid_body()).await).await;
    assert_ne!(again, first, "an expired key is a new request");
    assert_eq!(count(&app.db, "orders").await, 52, "orders stay: only the keys expire");
}

#[tokio::test]
async fn an_expired_key_not_yet_removed_counts_as_absent_and_a_live_one_still_replays() {
    // The shipped TTL (24 h); keys made old by hand, before any removal round has run.
    let app = spawn_app().await;
    let old = id_of(create_with_key(&app, "old", &valid_body()).await).await;
    let live = id_of(create_with_key(&app, "live", &valid_body()).await).await;
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '24 hours 1 second' WHERE key = 'old'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '23 hours 59 minutes' WHERE key = 'live'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let reused = create_with_key(&app, "old", &valid_body()).await;
    assert!(reused.headers().get("idempotent-replayed").is_none());
    let reused = id_of(reused).await;
    assert_ne!(reused, old);
    // The key now stands for the new order, for another full TTL.
    let retry = create_with_key(&app, "old", &valid_body()).await;
    assert_eq!(id_of(retry).await, reused);
    let retry = create_with_key(&app, "live", &valid_body()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(retry).await, live);
    assert_eq!(count(&app.db, "orders").await, 3);
}
