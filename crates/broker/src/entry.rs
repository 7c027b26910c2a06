//! A stream entry as a NATS message: the payload is the body, every other field a header of
//! its own name, and the event id is `Nats-Msg-Id` besides (JetStream's de-duplication key).
//! The trace context is in the `traceparent` and `tracestate` headers, where any NATS tool
//! that speaks W3C trace context looks for it.

use async_nats::HeaderMap;
use bytes::Bytes;
use domain::{fields, StreamEntry};

/// The header JetStream de-duplicates by.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// Why an entry cannot be a NATS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Header values are one line of visible ASCII and spaces.
    #[error("field {field} cannot be a NATS header: {reason}")]
    Header { field: &'static str, reason: &'static str },
    /// The message is larger than the server takes.
    #[error("the message is {size} bytes, more than the NATS server's max_payload of {max}")]
    TooLarge { size: usize, max: usize },
}

/// An entry as a message: its headers and body.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Headers and body, as the server counts them against `max_payload` (roughly: the
    /// header block's framing is counted too).
    pub size: usize,
}

/// Encodes `entry`; a message larger than `max_payload` is refused here, before the server.
pub fn encode(entry: &StreamEntry, max_payload: usize) -> Result<Encoded, EncodeError> {
    let mut headers = HeaderMap::new();
    let mut size = "NATS/1.0\r\n\r\n".len();
    let mut body = Bytes::new();
    for (name, value) in entry.to_fields() {
        if name == fields::PAYLOAD {
            body = Bytes::from(value);
            continue;
        }
        check_header(name, &value)?;
        size += name.len() + value.len() + 4;
        headers.insert(name, value.as_str());
    }
    let event_id = entry.event_id.to_string();
    size += MSG_ID.len() + event_id.len() + 4 + body.len();
    headers.insert(MSG_ID, event_id.as_str());
    if size > max_payload {
        return Err(EncodeError::TooLarge { size, max: max_payload });
    }
    Ok(Encoded { headers, body, size })
}

fn check_header(field: &'static str, value: &str) -> Result<(), EncodeError> {
    if value.is_empty() {
        return Err(EncodeError::Header { field, reason: "empty" });
    }
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(EncodeError::Header { field, reason: "not printable ASCII" });
    }
    Ok(())
}

/// Fields as they were read (a dead letter's, which may not decode) as a message again:
/// `payload` the body, the others headers; no `Nats-Msg-Id`.
pub fn message_of_fields(pairs: &[(String, Vec<u8>)]) -> Result<(HeaderMap, Bytes), EncodeError> {
    let mut headers = HeaderMap::new();
    let mut body = Bytes::new();
    for (name, value) in pairs {
        if name == fields::PAYLOAD {
            body = Bytes::from(value.clone());
            continue;
        }
        let value =
            std::str::from_utf8(value).map_err(|_| EncodeError::Header { field: "(a field)", reason: "not UTF-8" })?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(EncodeError::Header { field: "(a field's name)", reason: "not a header name" });
        }
        check_header("(a field)", value)?;
        headers.append(name.as_str(), value);
    }
    Ok((headers, body))
}

/// A message's fields, as a Redis entry's would read: every header but JetStream's own
/// (`Nats-*`), then `payload` from the body. Decoding them is the reader's (a malformed entry
/// is dead-lettered with its reason, whichever broker carried it).
pub fn fields_of(headers: Option<&HeaderMap>, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            for value in values {
                out.push((name.to_owned(), value.as_str().as_bytes().to_vec()));
            }
        }
    }
    out.push((fields::PAYLOAD.to_owned(), body.to_vec()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_with(tenant: &str) -> StreamEntry {
        let fields = [
            ("event_id", "01JBENCHEVENT0000000000000"),
            ("event_type", "OrderPlaced"),
            ("aggregate_type", "order"),
            ("aggregate_id", "01JBENCHAGGR00000000000000"),
            ("seq", "3"),
            ("occurred_at", "2026-12-06T01:02:03.456789Z"),
            ("payload", r#"{"items":[{"sku":"A","qty":1}],"note":"line\nbreak"}"#),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("tenant_id", tenant),
        ];
        StreamEntry::from_fields(fields).expect("a valid entry")
    }

    fn entry() -> StreamEntry {
        entry_with("acme")
    }

    #[test]
    fn an_entry_reads_back_as_the_fields_it_was_written_from() {
        let e = entry();
        let encoded = encode(&e, 1 << 20).expect("encodes");
        assert_eq!(encoded.headers.get(MSG_ID).map(|v| v.as_str().to_owned()), Some(e.event_id.to_string()));
        let fields = fields_of(Some(&encoded.headers), &encoded.body);
        assert!(fields.iter().all(|(k, _)| k != MSG_ID), "JetStream's own headers are not fields");
        let back = StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v))).expect("decodes");
        assert_eq!(back, e);
    }

    #[test]
    fn a_field_that_cannot_be_a_header_and_a_message_too_large_are_refused() {
        let mut e = entry();
        e.traceparent = Some("00-x\r\nNats-Msg-Id: x".to_owned());
        assert_eq!(
            encode(&e, 1 << 20).map(|_| ()),
            Err(EncodeError::Header { field: fields::TRACEPARENT, reason: "not printable ASCII" })
        );
        let e = entry();
        let size = encode(&e, 1 << 20).expect("encodes").size;
        assert_eq!(encode(&e, size).map(|_| ()), Ok(()));
        assert_eq!(encode(&e, size - 1).map(|_| ()), Err(EncodeError::TooLarge { size, max: size - 1 }));
    }
}
