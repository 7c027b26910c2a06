//! The trace context of the `outbox append` span, a child of the span around `append`, is
//! stored in the outbox row.
//! (Its own test binary: it installs a global subscriber.)

use chrono::Utc;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use outbox::{append, NewEvent, MIGRATOR};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test]
async fn the_current_trace_context_is_stored_with_the_event() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("install subscriber");

    let db = test_support::fresh_database("outbox_trace").await;
    MIGRATOR.run(&db.pool).await.expect("migrate");
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let span = tracing::info_span!("request");
    telemetry::propagation::set_remote_parent(&span, Some(incoming), Some("vendor=1"));
    let request_span_id = span.context().span().span_context().span_id().to_string();
    let pool = db.pool.clone();
    async move {
        let mut tx = pool.begin().await.expect("begin");
        let event = NewEvent {
            aggregate_type: "order",
            aggregate_id: "agg",
            event_type: "OrderCreated",
            payload: "{}",
            occurred_at: Utc::now(),
            notify: false,
        };
        append(&mut tx, event).await.expect("append");
        tx.commit().await.expect("commit");
    }
    .instrument(span)
    .await;

    let (tp, ts): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT traceparent, tracestate FROM outbox").fetch_one(&db.pool).await.expect("row");
    let tp = tp.expect("traceparent stored");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace as the request");
    assert_ne!(parts[2], "00f067aa0ba902b7", "the stored parent is our span, not the caller's");
    assert_ne!(parts[2], request_span_id, "the stored parent is the append's own span, not its caller's");
    assert_eq!(parts[3], "01", "sampled flag kept");
    assert_eq!(ts.as_deref(), Some("vendor=1"));
}
