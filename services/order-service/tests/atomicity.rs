//! A state change and its event commit together or not at all. Failures are injected in the
//! test's own database: a trigger that makes the outbox insert fail after the order row is
//! written.

mod common;

use common::{count, events, problem, spawn_app, valid_body};

async fn break_outbox(db: &test_support::TestDatabase) {
    sqlx::query(
        "CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected outbox failure'; END $$",
    )
    .execute(&db.pool)
    .await
    .expect("create trigger function");
    sqlx::query("CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION fail_outbox()")
        .execute(&db.pool)
        .await
        .expect("install failing trigger");
}

async fn repair_outbox(db: &test_support::TestDatabase) {
    sqlx::query("DROP TRIGGER fail_outbox ON outbox").execute(&db.pool).await.expect("drop trigger");
}

#[tokio::test]
async fn a_failed_event_write_leaves_no_order() {
    let app = spawn_app().await;
    break_outbox(&app.db).await;

    let r =
        app.client.post(app.url("/orders")).header("idempotency-key", "k").json(&valid_body()).send().await.unwrap();
    let p = problem(r, 500).await;
    assert!(!p.to_string().contains("injected"), "internal detail must not leak: {p}");
    assert_eq!(count(&app.db, "orders").await, 0);
    assert_eq!(count(&app.db, "outbox").await, 0);
    assert_eq!(count(&app.db, "idempotency_keys").await, 0);

    // Once the fault is gone, the same keyed request succeeds: the key was not used up.
    repair_outbox(&app.db).await;
    let r =
        app.client.post(app.url("/orders")).header("idempotency-key", "k").json(&valid_body()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(events(&app.db, &id).await, vec![(1, "OrderCreated".into())]);
}

#[tokio::test]
async fn a_failed_event_write_leaves_the_status_unchanged() {
    let app = spawn_app().await;
    let order = app.create_order().await;
    let id = order["id"].as_str().unwrap();
    break_outbox(&app.db).await;

    for action in ["confirm", "cancel"] {
        problem(app.post_empty(&format!("/orders/{id}/{action}")).await, 500).await;
        let now: serde_json::Value = app.get(&format!("/orders/{id}")).await.json().await.unwrap();
        assert_eq!(now, order, "{action} must not change the order without its event");
    }
    repair_outbox(&app.db).await;
    assert_eq!(app.post_empty(&format!("/orders/{id}/confirm")).await.status(), 200);
    // The failed attempts consumed no sequence numbers.
    assert_eq!(events(&app.db, id).await, vec![(1, "OrderCreated".into()), (2, "OrderConfirmed".into())]);
}
