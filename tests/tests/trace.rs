//! One trace per order across the three services, as exported over OTLP to a collector the
//! test runs: order-service's request span (continuing the caller's `traceparent`) → the
//! relay's PRODUCER span → the consumer's CONSUMER span. Also: unsampled callers stay
//! unsampled everywhere, and `/metrics` of each service is well-formed Prometheus text.

use std::collections::HashMap;
use std::time::Duration;

use otlp_collector::{CollectedSpan, Collector, Kind};
use system_tests::semconv::assert_messaging_span;
use system_tests::system::{hex_id, traceparent, Env, System};
use system_tests::{exposition, ServiceProcess};

const SKU: &str = "SKU-TRACE";
const WAIT: Duration = Duration::from_secs(30);

/// Services export to the collector: order-service and consumer over grpc, the relay over
/// http/protobuf. The batch delay is far longer than a test, so spans reach the collector
/// only through the flush each binary does on SIGTERM: the tests prove that flush too.
fn exporting_to(collector: &Collector) -> Env {
    let mut env = Env::default()
        .all("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .all("OTEL_BSP_SCHEDULE_DELAY", "600000");
    env.relay = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), collector.http_endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), "http/protobuf".to_owned()),
    ];
    env
}

/// Stream entries of `order_id`: event_type → (event_id, traceparent).
async fn stream_events(system: &System, order_id: &str) -> HashMap<String, (String, Option<String>)> {
    system
        .stream_entries(order_id)
        .await
        .into_iter()
        .map(|mut e| {
            let event_type = e.remove("event_type").expect("event_type field");
            (event_type, (e.remove("event_id").expect("event_id field"), e.remove("traceparent")))
        })
        .collect()
}

/// `/metrics` parses as Prometheus text, has samples, and no label carries an id.
async fn check_metrics(service: &ServiceProcess, ids: &[&str]) -> String {
    let resp = service.http().get(service.url("/metrics")).send().await.expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("metrics body");
    let families = exposition::parse(&text)
        .unwrap_or_else(|e| panic!("{}: /metrics is not Prometheus text: {e}\n{text}", service.name()));
    assert!(families.iter().any(|f| !f.samples.is_empty()), "{}: no samples\n{text}", service.name());
    for family in &families {
        assert!(
            family.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{}: name {}",
            service.name(),
            family.name
        );
        if let Some(unit) = &family.unit {
            assert!(family.name.ends_with(&format!("_{unit}")), "{}: {} has unit {unit}", service.name(), family.name);
        }
        match family.kind.as_str() {
            "counter" => assert!(
                family.samples.iter().all(|s| s.name.ends_with("_total") || s.name.ends_with("_created")),
                "{}: counter {} without _total",
                service.name(),
                family.name
            ),
            "histogram" if !family.samples.is_empty() => {
                let has = |suffix: &str| family.samples.iter().any(|s| s.name == format!("{}{suffix}", family.name));
                assert!(
                    has("_sum") && has("_count"),
                    "{}: histogram {} lacks _sum/_count",
                    service.name(),
                    family.name
                );
                assert!(
                    family.samples.iter().any(|s| s.labels.get("le").map(String::as_str) == Some("+Inf")),
                    "{}: histogram {} lacks the +Inf bucket",
                    service.name(),
                    family.name
                );
            }
            _ => {}
        }
        for sample in &family.samples {
            for value in sample.labels.values() {
                assert!(
                    !ids.iter().any(|id| value.contains(id)),
                    "{}: id used as a label value in {sample:?}",
                    service.name()
                );
            }
        }
    }
    text
}

struct Spans<'a>(&'a [CollectedSpan]);

impl Spans<'_> {
    fn show(&self) -> String {
        self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    }

    fn find(&self, what: &str, pred: impl Fn(&CollectedSpan) -> bool) -> &CollectedSpan {
        let mut matching = self.0.iter().filter(|s| pred(s));
        let span = matching.next().unwrap_or_else(|| panic!("no span {what}; received:\n{}", self.show()));
        assert!(matching.next().is_none(), "more than one span {what}; received:\n{}", self.show());
        span
    }

    /// Parent, grandparent, … of `span` among the received spans.
    fn ancestors(&self, span: &CollectedSpan) -> Vec<&CollectedSpan> {
        let by_id: HashMap<&str, &CollectedSpan> = self.0.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let mut chain = Vec::new();
        let mut parent = span.parent_span_id.as_str();
        while let Some(p) = by_id.get(parent) {
            chain.push(*p);
            parent = p.parent_span_id.as_str();
            assert!(chain.len() < 100, "parent cycle");
        }
        chain
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_links_order_service_relay_and_consumer() {
    one_trace_through(broker::Kind::Redis).await;
}

/// On NATS the trace context travels in the messages' `traceparent` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_links_order_service_relay_and_consumer_on_nats() {
    one_trace_through(broker::Kind::Nats).await;
}

async fn one_trace_through(broker: broker::Kind) {
    let collector = Collector::start().await.expect("collector");
    let mut system = System::start(exporting_to(&collector).on(broker)).await;
    system.set_stock(SKU, 100).await;

    let trace = hex_id(16);
    let (create_parent, confirm_parent) = (hex_id(8), hex_id(8));
    let order_id = system.create_order(SKU, 2, &traceparent(&trace, &create_parent, true)).await;
    system.post(&format!("/orders/{order_id}/confirm"), None, &traceparent(&trace, &confirm_parent, true)).await;
    system.wait_for_stock(SKU, (98, 0), WAIT).await;

    let events = stream_events(&system, &order_id).await;
    let ids: Vec<&str> = std::iter::once(order_id.as_str()).chain(events.values().map(|(id, _)| id.as_str())).collect();
    for service in [&system.order_service, &system.relay, &system.consumer] {
        let text = check_metrics(service, &ids).await;
        if std::env::var_os("SYSTEM_TESTS_SHOW_METRICS").is_some() {
            eprintln!("--- {} /metrics ---\n{text}", service.name());
        }
    }
    // Graceful shutdown flushes whatever the exporters still hold.
    system.stop().await;

    let all = collector.spans();
    let spans = Spans(&all);
    if std::env::var_os("SYSTEM_TESTS_SHOW_SPANS").is_some() {
        eprintln!("{}", spans.show());
    }
    let in_trace: Vec<&CollectedSpan> = all.iter().filter(|s| s.trace_id == trace).collect();
    for service in ["order-service", "relay", "inventory-consumer"] {
        assert!(
            in_trace.iter().any(|s| s.service_name == service),
            "no {service} span in the trace; received:\n{}",
            spans.show()
        );
    }

    let requests = [
        ("OrderCreated", "POST /orders", &create_parent, "201"),
        ("OrderConfirmed", "POST /orders/{id}/confirm", &confirm_parent, "200"),
    ];
    for (event_type, route_name, caller, status) in requests {
        let server = spans.find(&format!("`{route_name}` of order-service"), |s| {
            s.service_name == "order-service" && s.name == route_name && s.trace_id == trace
        });
        assert_eq!(server.kind, Kind::Server);
        assert_eq!(&server.parent_span_id, caller, "the incoming traceparent is the request span's parent");
        assert_eq!(server.attribute("http.request.method"), Some("POST"));
        assert_eq!(server.attribute("http.response.status_code"), Some(status));
        let path = server.attribute("url.path").unwrap_or_default();
        assert!(path.starts_with("/orders"), "url.path of {server}");
        assert_eq!(server.attribute("url.scheme"), Some("http"));
        assert_eq!(server.attribute("server.address"), Some("127.0.0.1"));
        assert!(server.attribute("server.port").is_some_and(|p| p.parse::<u16>().is_ok()), "{server}");
        assert_eq!(server.attribute("network.protocol.version"), Some("1.1"));
        assert_eq!(server.attribute("error.type"), None, "a success has no error.type: {server}");

        let (event_id, entry_traceparent) =
            events.get(event_type).unwrap_or_else(|| panic!("no {event_type} entry on the stream"));
        let is_event = |s: &CollectedSpan| s.attribute("messaging.message.id") == Some(event_id);
        let publish = spans.find(&format!("publishing {event_type}"), |s| s.service_name == "relay" && is_event(s));
        assert_messaging_span(publish, "send", &system.stream, system.broker_url());
        assert_eq!(publish.trace_id, trace);
        assert!(
            publish.attribute("outbox.wait_ms").and_then(|v| v.parse::<i64>().ok()).is_some(),
            "time in the outbox: {publish}"
        );
        let chain = spans.ancestors(publish);
        assert!(chain.iter().any(|a| a.span_id == server.span_id), "{route_name} span is not an ancestor of {publish}");
        assert!(
            chain.iter().all(|a| a.service_name == "order-service"),
            "the publish span continues the appending request: {chain:?}"
        );
        assert_eq!(
            entry_traceparent.as_deref(),
            Some(traceparent(&trace, &publish.span_id, true).as_str()),
            "the stream entry carries the publish span's context"
        );

        let process =
            spans.find(&format!("processing {event_type}"), |s| s.service_name == "inventory-consumer" && is_event(s));
        assert_messaging_span(process, "process", &system.stream, system.broker_url());
        assert_eq!(process.trace_id, trace);
        assert_eq!(process.parent_span_id, publish.span_id, "the consumer span is a child of the publish span");
        let group = process.attribute("messaging.consumer.group.name");
        assert!(group.is_some_and(|g| g.starts_with("inventory")), "messaging.consumer.group.name of {process}");
        let link = (trace.clone(), process.span_id.clone());
        let batch = spans.find(&format!("consumer database work linked to {event_type}"), |s| {
            s.service_name == "inventory-consumer" && s.links.contains(&link)
        });
        assert_messaging_span(batch, "process", &system.stream, system.broker_url());
        assert!(batch.attribute("messaging.message.id").is_none(), "a batch span names no one message: {batch}");
        assert_eq!(batch.attribute("messaging.consumer.group.name"), group);
        let count = batch.attribute("messaging.batch.message_count").and_then(|n| n.parse::<usize>().ok());
        assert!(count.is_some_and(|n| n >= 1 && n >= batch.links.len()), "messaging.batch.message_count of {batch}");
        assert!(
            all.iter().any(|s| s.name == "apply batch" && s.parent_span_id == batch.span_id),
            "the batch transaction runs under the linked span {batch}"
        );
        assert!(
            process.attribute("time_in_stream_ms").and_then(|v| v.parse::<i64>().ok()).is_some(),
            "time in the stream: {process}"
        );
    }
    // Everything about this order is in the caller's trace.
    for span in all.iter().filter(|s| s.attribute("messaging.message.id").is_some_and(|id| ids.contains(&id))) {
        assert_eq!(span.trace_id, trace, "{span}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_caller_is_not_traced_anywhere() {
    let collector = Collector::start().await.expect("collector");
    let mut system = System::start(exporting_to(&collector)).await;
    system.set_stock(SKU, 100).await;

    let unsampled = hex_id(16);
    let unsampled_order = system.create_order(SKU, 2, &traceparent(&unsampled, &hex_id(8), false)).await;
    system.wait_for_stock(SKU, (100, 2), WAIT).await;
    // A sampled order afterwards, through the same exporters: its spans arriving shows that
    // export works, so the absence of the other trace means it was not sampled.
    let sampled = hex_id(16);
    system.create_order(SKU, 3, &traceparent(&sampled, &hex_id(8), true)).await;
    system.wait_for_stock(SKU, (100, 5), WAIT).await;

    let events = stream_events(&system, &unsampled_order).await;
    let (_, entry_traceparent) = events.get("OrderCreated").expect("OrderCreated entry");
    let entry_traceparent = entry_traceparent.as_deref().expect("the entry carries a traceparent");
    assert!(
        entry_traceparent.starts_with(&format!("00-{unsampled}-")) && entry_traceparent.ends_with("-00"),
        "the unsampled decision travels with the event: {entry_traceparent}"
    );
    system.stop().await;

    let all = collector.spans();
    for service in ["order-service", "relay", "inventory-consumer"] {
        assert!(
            all.iter().any(|s| s.trace_id == sampled && s.service_name == service),
            "no {service} span of the sampled order"
        );
    }
    let leaked: Vec<String> = all.iter().filter(|s| s.trace_id == unsampled).map(ToString::to_string).collect();
    assert!(leaked.is_empty(), "spans of an unsampled trace were exported:\n{}", leaked.join("\n"));
}
