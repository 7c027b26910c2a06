//! The OpenTelemetry semantic conventions a messaging span must follow.

use otlp_collector::{CollectedSpan, Kind};

/// Panics unless `span` is the messaging span of `operation` (`send`, `receive`, `process`) on
/// `destination` of the broker at `broker_url` (Redis, or NATS for a `nats://` URL): its name,
/// kind and attributes as the messaging conventions say (`messaging.system`,
/// `messaging.operation.name` and `.type`, `messaging.destination.name`,
/// `messaging.client.id`, `server.address`, `server.port`).
pub fn assert_messaging_span(span: &CollectedSpan, operation: &str, destination: &str, broker_url: &str) {
    assert_eq!(span.name, format!("{operation} {destination}"), "{span}");
    let kind = match operation {
        "send" => Kind::Producer,
        "receive" => Kind::Client,
        _ => Kind::Consumer,
    };
    assert_eq!(span.kind, kind, "{span}");
    let (system, host, port) = match broker_url.strip_prefix("nats://") {
        Some(address) => {
            let (host, port) = address.rsplit_once(':').unwrap_or((address, "4222"));
            ("nats", host.to_owned(), port.to_owned())
        }
        None => {
            let info = redis::Client::open(broker_url).expect("a Redis URL").get_connection_info().addr.clone();
            let redis::ConnectionAddr::Tcp(host, port) = info else { panic!("a TCP Redis URL: {broker_url}") };
            ("redis", host, port.to_string())
        }
    };
    let expected = [
        ("messaging.system", system),
        ("messaging.operation.name", operation),
        ("messaging.operation.type", operation),
        ("messaging.destination.name", destination),
        ("server.address", host.as_str()),
        ("server.port", port.as_str()),
    ];
    for (key, value) in expected {
        assert_eq!(span.attribute(key), Some(value), "{key} of {span}");
    }
    assert!(span.attribute("messaging.client.id").is_some_and(|id| !id.is_empty()), "messaging.client.id of {span}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, kind: Kind, attributes: &[(&str, &str)]) -> CollectedSpan {
        CollectedSpan {
            service_name: "relay".into(),
            scope_name: String::new(),
            trace_id: String::new(),
            span_id: String::new(),
            parent_span_id: String::new(),
            name: name.into(),
            kind,
            start_unix_nano: 0,
            end_unix_nano: 0,
            attributes: attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            links: Vec::new(),
        }
    }

    const SEND: [(&str, &str); 7] = [
        ("messaging.system", "redis"),
        ("messaging.operation.name", "send"),
        ("messaging.operation.type", "send"),
        ("messaging.destination.name", "orders.events"),
        ("messaging.client.id", "relay-h-1"),
        ("server.address", "127.0.0.1"),
        ("server.port", "6379"),
    ];

    /// The checker passes a conforming span and catches each kind of departure (the control).
    #[test]
    fn a_span_departing_from_the_conventions_is_caught() {
        let url = "redis://127.0.0.1:6379";
        assert_messaging_span(&span("send orders.events", Kind::Producer, &SEND), "send", "orders.events", url);
        let departures = [
            span("orders.events publish", Kind::Producer, &SEND),
            span("send orders.events", Kind::Internal, &SEND),
            span("send orders.events", Kind::Producer, &SEND[..6]),
            span("send orders.events", Kind::Producer, &SEND[1..]),
        ];
        for bad in departures {
            let caught = std::panic::catch_unwind(|| assert_messaging_span(&bad, "send", "orders.events", url));
            assert!(caught.is_err(), "not caught: {bad}");
        }
    }
}
