//! The order API of the contract: status codes, bodies, and the events each call writes.

mod common;

use common::{count, events, problem, spawn_app};
use serde_json::json;

#[tokio::test]
async fn create_returns_201_location_and_the_order() {
    let app = spawn_app().await;
    let body = json!({"customer_id": "c-1", "items": [
        {"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
        {"sku": "B", "quantity": 3, "unit_price_cents": 100}]});
    let r = app.post_json("/orders", &body).await;
    assert_eq!(r.status(), 201);
    let id_location = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["content-type"], "application/json");
    let order: serde_json::Value = r.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    assert_eq!(id_location, format!("/orders/{id}"));
    assert!(ulid::Ulid::from_string(id).is_ok());
    assert_eq!(order["customer_id"], "c-1");
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["items"], body["items"]);
    assert_eq!(order["total_cents"], 2 * 1250 + 3 * 100);
    assert_eq!(order["created_at"], order["updated_at"]);
    let keys: Vec<_> = order.as_object().unwrap().keys().cloned().collect();
    let mut expected = ["id", "customer_id", "status", "items", "total_cents", "created_at", "updated_at"];
    expected.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, expected);

    // The stored order reads back identically, and exactly one OrderCreated event exists.
    let fetched: serde_json::Value = app.get(&id_location).await.json().await.unwrap();
    assert_eq!(fetched, order);
    assert_eq!(events(&app.db, id).await, vec![(1, "OrderCreated".to_owned())]);
    let payload: serde_json::Value = sqlx::query_scalar("SELECT payload FROM outbox WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(payload, json!({"order_id": id, "customer_id": "c-1", "items": body["items"], "total_cents": 2800}));
    let aggregate_type: String = sqlx::query_scalar("SELECT aggregate_type FROM outbox WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(aggregate_type, "order");
}

#[tokio::test]
async fn get_unknown_or_malformed_id_is_404() {
    let app = spawn_app().await;
    let unknown = ulid::Ulid::new().to_string();
    for path in [format!("/orders/{unknown}"), "/orders/not-an-id".to_owned(), "/orders/%FF%FE".to_owned()] {
        let p = problem(app.get(&path).await, 404).await;
        assert_eq!(p["title"], "Not Found", "{path}");
    }
    for path in [format!("/orders/{unknown}/confirm"), format!("/orders/{unknown}/cancel"), "/orders/x/cancel".into()] {
        problem(app.post_empty(&path).await, 404).await;
    }
    assert_eq!(count(&app.db, "outbox").await, 0);
}

#[tokio::test]
async fn confirm_then_cancel_writes_one_event_each() {
    let app = spawn_app().await;
    let order = app.create_order().await;
    let id = order["id"].as_str().unwrap();

    let r = app.post_empty(&format!("/orders/{id}/confirm")).await;
    assert_eq!(r.status(), 200);
    let confirmed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(confirmed["status"], "CONFIRMED");
    assert_eq!(confirmed["created_at"], order["created_at"]);
    assert_eq!(app.get(&format!("/orders/{id}")).await.json::<serde_json::Value>().await.unwrap(), confirmed);

    // Confirming again is a no-op: 200, same order, nothing written.
    let again = app.post_empty(&format!("/orders/{id}/confirm")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap(), confirmed);

    let cancelled: serde_json::Value = app.post_empty(&format!("/orders/{id}/cancel")).await.json().await.unwrap();
    assert_eq!(cancelled["status"], "CANCELLED");
    let again = app.post_empty(&format!("/orders/{id}/cancel")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap(), cancelled);

    // A cancelled order cannot be confirmed.
    let p = problem(app.post_empty(&format!("/orders/{id}/confirm")).await, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("CANCELLED"), "{p}");

    let types: Vec<_> = events(&app.db, id).await;
    assert_eq!(types, vec![(1, "OrderCreated".into()), (2, "OrderConfirmed".into()), (3, "OrderCancelled".into())]);
    let payloads: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE aggregate_id = $1 AND seq > 1 ORDER BY seq")
            .bind(id)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(payloads, vec![json!({"order_id": id}), json!({"order_id": id})]);
    // The event time is the time of the change.
    let occurred: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT occurred_at FROM outbox WHERE aggregate_id = $1 AND seq = 3")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let updated_at: chrono::DateTime<chrono::Utc> = cancelled["updated_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(occurred, updated_at);
}

#[tokio::test]
async fn pending_order_can_be_cancelled_directly() {
    let app = spawn_app().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();
    let r = app.post_empty(&format!("/orders/{id}/cancel")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["status"], "CANCELLED");
    problem(app.post_empty(&format!("/orders/{id}/confirm")).await, 409).await;
    assert_eq!(events(&app.db, &id).await, vec![(1, "OrderCreated".into()), (2, "OrderCancelled".into())]);
}

#[tokio::test]
async fn transitions_ignore_any_body() {
    let app = spawn_app().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();
    let r = app.post_raw(&format!("/orders/{id}/confirm"), Some("text/plain"), "whatever").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = spawn_app().await;
    problem(app.get("/nope").await, 404).await;
    let r = app.client.delete(app.url("/orders")).send().await.unwrap();
    problem(r, 405).await;
    let r = app.client.put(app.url(&format!("/orders/{}", ulid::Ulid::new()))).send().await.unwrap();
    problem(r, 405).await;
    // Creating with GET semantics on the collection is not a route either.
    problem(app.get("/orders").await, 405).await;
}

#[tokio::test]
async fn a_transition_never_moves_updated_at_backwards() {
    let app = spawn_app().await;
    let id = app.create_order().await["id"].as_str().unwrap().to_owned();
    // The last writer's clock was an hour ahead of this one.
    let ahead: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "UPDATE orders SET updated_at = date_trunc('milliseconds', now()) + interval '1 hour' \
                            WHERE id = $1 RETURNING updated_at",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let confirmed: serde_json::Value = app.post_empty(&format!("/orders/{id}/confirm")).await.json().await.unwrap();
    assert_eq!(confirmed["status"], "CONFIRMED");
    let updated_at: chrono::DateTime<chrono::Utc> = confirmed["updated_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(updated_at, ahead);
    let (stored, occurred): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT o.updated_at, e.occurred_at FROM orders o JOIN outbox e ON e.aggregate_id = o.id AND e.seq = 2 \
         WHERE o.id = $1",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((stored, occurred), (ahead, ahead));
    assert_eq!(events(&app.db, &id).await, vec![(1, "OrderCreated".into()), (2, "OrderConfirmed".into())]);
}
