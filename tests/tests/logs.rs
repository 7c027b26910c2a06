//! JSON logs (`LOG_FORMAT=json`) carry the `trace_id` and `span_id` of the span they were
//! written in, in every service, so a log line can be found from a trace. No OTLP endpoint is
//! set: trace context must flow (request → outbox → stream → consumer) without an exporter.

use std::time::Duration;

use system_tests::system::{hex_id, traceparent, Env, System};
use system_tests::ServiceProcess;

const SKU: &str = "SKU-LOGS";

/// The JSON log lines of `process` that carry `trace_id`.
fn lines_in_trace(process: &ServiceProcess, trace: &str) -> Vec<serde_json::Value> {
    process
        .logs()
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", process.name()))
        })
        .filter(|v| v["trace_id"] == trace)
        .collect()
}

fn is_span_id(value: &serde_json::Value) -> bool {
    value.as_str().is_some_and(|s| s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit()) && s != "0000000000000000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_of_every_service_carry_the_callers_trace_id() {
    let env = Env::default()
        .all("LOG_FORMAT", "json")
        .all("RUST_LOG", "info,order_service=debug,relay=debug,inventory_consumer=debug");
    let mut system = System::start(env).await;
    system.set_stock(SKU, 10).await;

    let (trace, caller) = (hex_id(16), hex_id(8));
    system.create_order(SKU, 1, &traceparent(&trace, &caller, true)).await;
    system.wait_for_stock(SKU, (10, 1), Duration::from_secs(30)).await;
    system.stop().await;

    for process in [&system.order_service, &system.relay, &system.consumer] {
        let lines = lines_in_trace(process, &trace);
        assert!(!lines.is_empty(), "{}: no JSON log line with trace_id {trace}\n{}", process.name(), process.tail(40));
        for line in &lines {
            assert!(is_span_id(&line["span_id"]), "{}: bad span_id in {line}", process.name());
            assert_ne!(line["span_id"], caller.as_str(), "the service's own span, not the caller's: {line}");
            assert!(line["level"].is_string() && line["timestamp"].is_string(), "{line}");
        }
    }
}
