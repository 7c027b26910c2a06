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
    assert_eq!((status, body["field"].as_str()), (422, Some("on_hand")));
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
