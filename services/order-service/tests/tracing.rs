//! The request span joins the caller's trace (`traceparent`), and the events a request writes
//! carry that trace context, so a consumer's work links back to the HTTP call.

mod common;

use common::{spawn_app, valid_body};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// Installs an OpenTelemetry layer (no exporter) as this test binary's global subscriber.
fn install_tracer() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("only test of this binary installs a subscriber");
}

async fn stored_traceparents(db: &test_support::TestDatabase, order_id: &str) -> Vec<Option<String>> {
    sqlx::query_scalar("SELECT traceparent FROM outbox WHERE aggregate_id = $1 ORDER BY seq")
        .bind(order_id)
        .fetch_all(&db.pool)
        .await
        .expect("read trace context")
}

#[tokio::test]
async fn events_carry_the_trace_context_of_the_request() {
    install_tracer();
    let app = spawn_app().await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    let r = app
        .client
        .post(app.url("/orders"))
        .header("traceparent", &traceparent)
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let r = app
        .client
        .post(app.url(&format!("/orders/{id}/confirm")))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    for stored in stored_traceparents(&app.db, &id).await {
        let stored = stored.expect("a traceparent is stored");
        let parts: Vec<&str> = stored.split('-').collect();
        assert_eq!(parts.len(), 4, "{stored}");
        assert_eq!(parts[1], TRACE_ID, "same trace as the request");
        assert_ne!(parts[2], PARENT_SPAN, "the event's parent is a span of this service");
        assert_eq!(parts[3], "01", "sampled");
    }

    // Without a traceparent the request starts a trace of its own; a malformed one is ignored.
    for header in [None, Some("garbage")] {
        let mut req = app.client.post(app.url("/orders")).json(&valid_body());
        if let Some(h) = header {
            req = req.header("traceparent", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 201);
        let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let stored = stored_traceparents(&app.db, &id).await.remove(0).expect("a new trace is recorded");
        assert!(!stored.contains(TRACE_ID), "{stored}");
    }
}
