//! Concurrent writers: creates never collide, and transitions of one order serialise on its
//! row lock, so each transition that happened wrote exactly one event with a contiguous seq.

mod common;

use common::{count, events, spawn_app, valid_body};
use rand::seq::SliceRandom;

#[tokio::test]
async fn two_hundred_concurrent_creates() {
    let app = spawn_app().await;
    let body = valid_body();
    let requests = (0..200).map(|_| app.post_json("/orders", &body));
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for r in responses {
        assert_eq!(r.status(), 201);
        ids.insert(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(count(&app.db, "orders").await, 200);
    let created: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, seq FROM outbox WHERE event_type = 'OrderCreated'")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(created.len(), 200);
    assert!(created.iter().all(|(id, seq)| *seq == 1 && ids.contains(id)));
}

/// Several orders at once, 50 racing confirm/cancel calls each, so a lost race shows up
/// reliably rather than once in a while.
#[tokio::test]
async fn fifty_concurrent_transitions_of_one_order() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(app.create_order().await["id"].as_str().unwrap().to_owned());
    }
    let rounds = ids.iter().map(|id| race_transitions(&app, id));
    futures::future::join_all(rounds).await;
}

async fn race_transitions(app: &common::TestAppWithDb, id: &str) {
    let mut actions: Vec<&str> = [["confirm"; 25], ["cancel"; 25]].concat();
    actions.shuffle(&mut rand::rng());
    let requests = actions.iter().map(|action| {
        let path = format!("/orders/{id}/{action}");
        async move { (*action, app.post_empty(&path).await.status().as_u16()) }
    });
    let results = futures::future::join_all(requests).await;

    let events = events(&app.db, id).await;
    let seqs: Vec<i64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>(), "seqs without gaps");
    let types: Vec<&str> = events.iter().map(|(_, t)| t.as_str()).collect();
    let confirmed = types.contains(&"OrderConfirmed");
    if confirmed {
        assert_eq!(types, ["OrderCreated", "OrderConfirmed", "OrderCancelled"]);
    } else {
        assert_eq!(types, ["OrderCreated", "OrderCancelled"]);
    }
    // Cancel always succeeds; a confirm fails only when it ran after the cancel.
    assert!(results.iter().filter(|(a, _)| *a == "cancel").all(|(_, s)| *s == 200), "{results:?}");
    let confirms_ok = results.iter().filter(|(a, s)| *a == "confirm" && *s == 200).count();
    let confirms_conflict = results.iter().filter(|(a, s)| *a == "confirm" && *s == 409).count();
    assert_eq!(confirms_ok + confirms_conflict, 25, "{results:?}");
    assert_eq!(confirmed, confirms_ok > 0, "a confirm succeeded if and only if OrderConfirmed was written");

    let order: serde_json::Value = app.get(&format!("/orders/{id}")).await.json().await.expect("order JSON");
    assert_eq!(order["status"], "CANCELLED");
    // The order numbers its own events: its version is its last event's seq, and the outbox
    // kept no counter for it.
    let version: i64 = sqlx::query_scalar("SELECT version FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .expect("read the order's version");
    assert_eq!(version, events.len() as i64);
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_counters WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .expect("count the outbox's counters");
    assert_eq!(counted, 0);
}
