//! The live feed through nginx, as compose runs it: two order-feed replicas behind the nginx
//! configuration compose uses. A client whose replica is killed reconnects through nginx, with
//! its last event id, to the other, and ends with every event of the run once, in order.

use std::time::Duration;

use system_tests::feed::{clients, publish, publish_as, replicas, serving};
use system_tests::nginx::Nginx;
use system_tests::ServiceProcess;
use test_support::sse::{ids, SseClient};
use ulid::Ulid;

#[tokio::test]
async fn through_nginx_a_client_whose_replica_dies_resumes_on_the_other_with_every_event_once() {
    let stream = test_support::unique_name("feed-nginx");
    let mut feeds = replicas(&stream, &[("FEED_HEARTBEAT", "1s")]).await;
    let nginx = Nginx::start(&[feeds[0].addr(), feeds[1].addr()]);
    let order = Ulid::new();
    let mut written = Vec::new();

    let mut client = SseClient::connect(&nginx.url("/events"), &[]).await;
    for seq in 1..=5 {
        written.push(publish(&stream, order, seq).await);
    }
    let mut got = ids(&client.take(5).await);
    let serving = serving(&feeds).await;
    feeds[serving].kill().await;
    // Written while the client is cut off: none may be lost.
    for seq in 6..=10 {
        written.push(publish(&stream, order, seq).await);
    }
    assert!(client.ends_within(Duration::from_secs(10)).await, "the dead replica's stream ended");
    // As EventSource does: reconnect to the same URL with the last id; nginx finds the live one.
    let last = got.last().cloned().expect("an event");
    let mut resumed = SseClient::connect(&nginx.url("/events"), &[("Last-Event-ID", last.as_str())]).await;
    got.extend(ids(&resumed.take(5).await));
    assert_eq!(got, written, "every event once, in order");
    assert_eq!(resumed.next(Duration::from_millis(500)).await, None, "nothing twice");
    let other = &feeds[1 - serving];
    assert_eq!(clients(other).await, Some(1), "the other replica serves it now");
    let metrics = other.http().get(other.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains(r#"feed_resumes_total{result="resumed"} 1"#), "{metrics}");
    // A token in the query string (EventSource cannot send headers) stays out of nginx's log.
    drop(SseClient::connect(&nginx.url("/events?access_token=not-for-the-log"), &[]).await);
    drop(resumed);
    let log = test_support::eventually("the requests logged", Duration::from_secs(10), || async {
        let log = nginx.access_log();
        (log.matches("GET /events").count() >= 3).then_some(log)
    })
    .await;
    assert!(!log.contains("not-for-the-log"), "{log}");
    let status = feeds[1 - serving].stop(Duration::from_secs(10)).await;
    assert!(status.success(), "the surviving replica stops cleanly");
}

/// The feed's span for an event is part of the event's trace: a child of the span the
/// `traceparent` of its stream entry names.
#[tokio::test]
async fn the_feeds_span_of_an_event_continues_the_events_trace() {
    let collector = otlp_collector::Collector::start().await.expect("collector");
    let stream = test_support::unique_name("feed-trace");
    let redis = test_support::redis_url();
    let endpoint = collector.grpc_endpoint();
    let mut feed = ServiceProcess::spawn(
        "order-feed",
        [
            ("REDIS_URL", redis.as_str()),
            ("REDIS_STREAM", stream.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    feed.wait_ready(Duration::from_secs(30)).await;
    let (trace, parent) = (system_tests::system::hex_id(16), system_tests::system::hex_id(8));
    let traceparent = system_tests::system::traceparent(&trace, &parent, true);
    let event_id = publish_as(&stream, Ulid::new(), 1, "OrderCreated", Some(traceparent)).await;
    let spans = collector
        .wait_for("the feed's span of the event", Duration::from_secs(30), |spans| {
            spans.iter().any(|s| s.service_name == "order-feed" && s.trace_id == trace)
        })
        .await;
    let span = spans.iter().find(|s| s.service_name == "order-feed" && s.trace_id == trace).expect("span");
    assert_eq!(span.parent_span_id, parent);
    system_tests::semconv::assert_messaging_span(span, "process", &stream, &redis);
    assert_eq!(span.attribute("messaging.message.id"), Some(event_id.as_str()));
    // An unsampled caller stays unsampled: no span of its trace is exported.
    let unsampled = system_tests::system::hex_id(16);
    let tp = system_tests::system::traceparent(&unsampled, &system_tests::system::hex_id(8), false);
    publish_as(&stream, Ulid::new(), 1, "OrderCreated", Some(tp)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(feed.stop(Duration::from_secs(10)).await.success());
    let spans = collector.spans();
    assert_eq!(spans.iter().filter(|s| s.trace_id == trace).count(), 1);
    assert_eq!(spans.iter().filter(|s| s.trace_id == unsampled).count(), 0);
}
