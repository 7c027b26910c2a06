//! The Redis stream entry of an event: a flat map of string fields (see the contract).

use chrono::{DateTime, SecondsFormat, Utc};
use ulid::Ulid;

use crate::TenantId;

/// Field names of a stream entry.
pub mod fields {
    pub const EVENT_ID: &str = "event_id";
    pub const EVENT_TYPE: &str = "event_type";
    pub const AGGREGATE_TYPE: &str = "aggregate_type";
    pub const AGGREGATE_ID: &str = "aggregate_id";
    pub const SEQ: &str = "seq";
    pub const OCCURRED_AT: &str = "occurred_at";
    pub const PAYLOAD: &str = "payload";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    pub const TENANT_ID: &str = "tenant_id";
}

/// Why a field map is not an event, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("invalid field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DecodeError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }

    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Missing(f) | Self::Invalid { field: f, .. } => f,
        }
    }
}

/// A stream entry id as numbers, for ordering (`1700000000000-3` → `(1700000000000, 3)`).
pub fn entry_id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// One event as it travels on the stream, still generic over aggregate and event type, so
/// the relay can publish rows without knowing their payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    pub event_id: Ulid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub seq: i64,
    pub occurred_at: DateTime<Utc>,
    /// JSON text.
    pub payload: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The tenant the event belongs to; entries written before there were tenants have no
    /// such field and belong to the tenant `default`.
    pub tenant_id: TenantId,
}

impl StreamEntry {
    /// The RFC 3339 form used on the stream: UTC, microseconds (Postgres' precision).
    pub fn format_time(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// The field/value pairs for XADD, in a stable order; absent trace fields are omitted.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (fields::EVENT_ID, self.event_id.to_string()),
            (fields::EVENT_TYPE, self.event_type.clone()),
            (fields::AGGREGATE_TYPE, self.aggregate_type.clone()),
            (fields::AGGREGATE_ID, self.aggregate_id.clone()),
            (fields::SEQ, self.seq.to_string()),
            (fields::OCCURRED_AT, Self::format_time(&self.occurred_at)),
            (fields::PAYLOAD, self.payload.clone()),
            (fields::TENANT_ID, self.tenant_id.to_string()),
        ];
        if let Some(tp) = &self.traceparent {
            out.push((fields::TRACEPARENT, tp.clone()));
        }
        if let Some(ts) = &self.tracestate {
            out.push((fields::TRACESTATE, ts.clone()));
        }
        out
    }

    /// Decodes a field map read from the stream. Unknown fields are ignored so producers can
    /// add fields; every known field is checked and the first problem is named.
    pub fn from_fields<I, K, V>(pairs: I) -> Result<Self, DecodeError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut raw: [Option<String>; 10] = Default::default();
        const NAMES: [&str; 10] = [
            fields::EVENT_ID,
            fields::EVENT_TYPE,
            fields::AGGREGATE_TYPE,
            fields::AGGREGATE_ID,
            fields::SEQ,
            fields::OCCURRED_AT,
            fields::PAYLOAD,
            fields::TRACEPARENT,
            fields::TRACESTATE,
            fields::TENANT_ID,
        ];
        for (key, value) in pairs {
            let Some(i) = NAMES.iter().position(|n| *n == key.as_ref()) else { continue };
            let value = std::str::from_utf8(value.as_ref()).map_err(|_| DecodeError::invalid(NAMES[i], "not UTF-8"))?;
            if raw[i].replace(value.to_owned()).is_some() {
                return Err(DecodeError::invalid(NAMES[i], "appears more than once"));
            }
        }
        let mut take = |i: usize| raw[i].take().ok_or(DecodeError::Missing(NAMES[i]));
        let event_id = take(0)?;
        let event_id =
            Ulid::from_string(&event_id).map_err(|_| DecodeError::invalid(fields::EVENT_ID, "not a ULID"))?;
        let event_type = non_empty(fields::EVENT_TYPE, take(1)?)?;
        let aggregate_type = non_empty(fields::AGGREGATE_TYPE, take(2)?)?;
        let aggregate_id = non_empty(fields::AGGREGATE_ID, take(3)?)?;
        let seq = match take(4)?.parse::<i64>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(DecodeError::invalid(fields::SEQ, "not a positive integer")),
        };
        let occurred_at = DateTime::parse_from_rfc3339(&take(5)?)
            .map_err(|e| DecodeError::invalid(fields::OCCURRED_AT, format!("not an RFC 3339 time: {e}")))?
            .with_timezone(&Utc);
        let payload = take(6)?;
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Err(DecodeError::invalid(fields::PAYLOAD, "not JSON"));
        }
        let traceparent = take(7).ok().filter(|s| !s.is_empty());
        let tracestate = take(8).ok().filter(|s| !s.is_empty());
        let tenant_id = match take(9) {
            Ok(tenant) => TenantId::parse(tenant)
                .map_err(|_| DecodeError::invalid(fields::TENANT_ID, "must match [a-z0-9][a-z0-9-]{0,63}"))?,
            Err(_) => TenantId::default_tenant(),
        };
        Ok(Self {
            event_id,
            event_type,
            aggregate_type,
            aggregate_id,
            seq,
            occurred_at,
            payload,
            traceparent,
            tracestate,
            tenant_id,
        })
    }
}

fn non_empty(field: &'static str, s: String) -> Result<String, DecodeError> {
    if s.is_empty() {
        Err(DecodeError::invalid(field, "empty"))
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, EventPayload, NewOrder, Order, OrderConfirmed};
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn created_event() -> Event {
        let new = NewOrder::parse("c-1", &[("SKU-1".into(), 2, 1250)]).unwrap();
        let order = Order::create(new, Utc::now());
        Event {
            event_id: Ulid::new(),
            aggregate_id: order.id,
            seq: 1,
            occurred_at: Utc.timestamp_micros(1_700_000_000_123_456).unwrap(),
            payload: EventPayload::created(&order),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
            tenant_id: crate::TenantId::parse("t-1").unwrap(),
        }
    }

    fn as_bytes(fields: Vec<(&'static str, String)>) -> Vec<(String, Vec<u8>)> {
        fields.into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())).collect()
    }

    #[test]
    fn event_round_trips_through_fields() {
        let event = created_event();
        let entry = StreamEntry::from_fields(as_bytes(event.to_entry().to_fields())).unwrap();
        assert_eq!(Event::try_from(&entry).unwrap(), event);
    }

    #[test]
    fn each_missing_field_is_named() {
        let fields = created_event().to_entry().to_fields();
        // Trace context is optional; an entry without a tenant is the tenant `default`'s.
        let optional = [fields::TRACEPARENT, fields::TRACESTATE, fields::TENANT_ID];
        for (name, _) in fields.iter().filter(|(n, _)| !optional.contains(n)) {
            let without: Vec<_> = fields.iter().filter(|(n, _)| n != name).cloned().collect();
            assert_eq!(StreamEntry::from_fields(as_bytes(without)), Err(DecodeError::Missing(name)));
        }
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (fields::EVENT_ID, "x"),
            (fields::SEQ, "0"),
            (fields::SEQ, "-1"),
            (fields::SEQ, "one"),
            (fields::OCCURRED_AT, "yesterday"),
            (fields::PAYLOAD, "{"),
            (fields::AGGREGATE_ID, ""),
            (fields::TENANT_ID, ""),
            (fields::TENANT_ID, "T-1"),
        ];
        for (field, value) in cases {
            let mut fields = created_event().to_entry().to_fields();
            fields.iter_mut().find(|(n, _)| *n == field).unwrap().1 = value.to_owned();
            assert_eq!(StreamEntry::from_fields(as_bytes(fields)).unwrap_err().field(), field, "{field}={value}");
        }
    }

    #[test]
    fn an_entry_without_a_tenant_is_the_default_tenants() {
        let fields: Vec<_> =
            created_event().to_entry().to_fields().into_iter().filter(|(n, _)| *n != fields::TENANT_ID).collect();
        assert_eq!(StreamEntry::from_fields(as_bytes(fields)).unwrap().tenant_id.as_str(), "default");
    }

    #[test]
    fn event_level_checks() {
        let mut entry = created_event().to_entry();
        entry.event_type = "OrderShipped".into();
        assert_eq!(Event::try_from(&entry).unwrap_err().field(), "event_type");
        let mut entry = created_event().to_entry();
        entry.payload = r#"{"order_id": 5}"#.into();
        assert_eq!(Event::try_from(&entry).unwrap_err().field(), "payload");
        let mut entry = created_event().to_entry();
        entry.payload = EventPayload::OrderConfirmed(OrderConfirmed { order_id: crate::OrderId::new() }).to_json();
        entry.event_type = "OrderConfirmed".into();
        assert_eq!(Event::try_from(&entry).unwrap_err().field(), "payload");
        let mut entry = created_event().to_entry();
        entry.aggregate_type = "invoice".into();
        assert_eq!(Event::try_from(&entry).unwrap_err().field(), "aggregate_type");
    }

    fn arb_entry() -> impl Strategy<Value = StreamEntry> {
        (
            any::<u128>(),
            "[A-Za-z]{1,20}",
            "[a-z]{1,10}",
            "\\PC{1,40}",
            1..i64::MAX,
            0i64..4_000_000_000_000_000,
            prop::option::of("[0-9a-f-]{1,60}"),
            prop::option::of("\\PC{1,60}"),
            (prop::collection::vec(any::<i32>(), 0..5), "[a-z0-9][a-z0-9-]{0,63}"),
        )
            .prop_map(|(id, et, at, aid, seq, micros, tp, ts, (payload, tenant))| StreamEntry {
                event_id: Ulid(id),
                event_type: et,
                aggregate_type: at,
                aggregate_id: aid,
                seq,
                occurred_at: Utc.timestamp_micros(micros).unwrap(),
                payload: serde_json::to_string(&payload).unwrap(),
                traceparent: tp,
                tracestate: ts,
                tenant_id: crate::TenantId::parse(tenant).unwrap(),
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(entry in arb_entry()) {
            prop_assert_eq!(StreamEntry::from_fields(as_bytes(entry.to_fields())), Ok(entry));
        }

        #[test]
        fn any_field_map_decodes_or_names_a_known_field(
            pairs in prop::collection::vec(
                (prop::sample::select(vec!["event_id", "event_type", "aggregate_type", "aggregate_id",
                    "seq", "occurred_at", "payload", "traceparent", "tenant_id", "other"]),
                 prop::collection::vec(any::<u8>(), 0..30)),
                0..12)
        ) {
            match StreamEntry::from_fields(pairs.iter().map(|(k, v)| (*k, v))) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.field() != "other" && !e.to_string().is_empty()),
            }
        }
    }
}
