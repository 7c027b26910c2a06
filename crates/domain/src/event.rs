use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::order::{LineItem, Order};
use crate::stream::{DecodeError, StreamEntry};
use crate::types::{CustomerId, OrderId, TenantId};
use crate::AGGREGATE_TYPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    OrderCreated,
    OrderConfirmed,
    OrderCancelled,
}

impl EventType {
    pub const ALL: [EventType; 3] = [Self::OrderCreated, Self::OrderConfirmed, Self::OrderCancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderCreated => "OrderCreated",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderCancelled => "OrderCancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub items: Vec<LineItem>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: OrderId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: OrderId,
}

/// What happened to an order; serialised as the `payload` field of a stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPayload {
    OrderCreated(OrderCreated),
    OrderConfirmed(OrderConfirmed),
    OrderCancelled(OrderCancelled),
}

impl EventPayload {
    pub fn created(order: &Order) -> Self {
        Self::OrderCreated(OrderCreated {
            order_id: order.id,
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            total_cents: order.total_cents,
        })
    }

    pub fn event_type(&self) -> EventType {
        match self {
            Self::OrderCreated(_) => EventType::OrderCreated,
            Self::OrderConfirmed(_) => EventType::OrderConfirmed,
            Self::OrderCancelled(_) => EventType::OrderCancelled,
        }
    }

    pub fn order_id(&self) -> OrderId {
        match self {
            Self::OrderCreated(e) => e.order_id,
            Self::OrderConfirmed(e) => e.order_id,
            Self::OrderCancelled(e) => e.order_id,
        }
    }

    /// The payload as JSON. Serialising these plain structs cannot fail.
    pub fn to_json(&self) -> String {
        let json = match self {
            Self::OrderCreated(e) => serde_json::to_string(e),
            Self::OrderConfirmed(e) => serde_json::to_string(e),
            Self::OrderCancelled(e) => serde_json::to_string(e),
        };
        json.unwrap_or_else(|e| unreachable!("order payloads always serialise: {e}"))
    }

    pub fn from_json(event_type: EventType, json: &str) -> Result<Self, serde_json::Error> {
        Ok(match event_type {
            EventType::OrderCreated => Self::OrderCreated(serde_json::from_str(json)?),
            EventType::OrderConfirmed => Self::OrderConfirmed(serde_json::from_str(json)?),
            EventType::OrderCancelled => Self::OrderCancelled(serde_json::from_str(json)?),
        })
    }
}

/// A decoded order event, as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: Ulid,
    pub aggregate_id: OrderId,
    pub seq: i64,
    pub occurred_at: DateTime<Utc>,
    pub payload: EventPayload,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub tenant_id: TenantId,
}

impl Event {
    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    pub fn to_entry(&self) -> StreamEntry {
        StreamEntry {
            event_id: self.event_id,
            event_type: self.event_type().as_str().to_owned(),
            aggregate_type: AGGREGATE_TYPE.to_owned(),
            aggregate_id: self.aggregate_id.to_string(),
            seq: self.seq,
            occurred_at: self.occurred_at,
            payload: self.payload.to_json(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            tenant_id: self.tenant_id.clone(),
        }
    }
}

impl TryFrom<&StreamEntry> for Event {
    type Error = DecodeError;

    /// Interprets an entry as an order event: known type, payload of that type, and a payload
    /// that names the same order as `aggregate_id`.
    fn try_from(entry: &StreamEntry) -> Result<Self, DecodeError> {
        if entry.aggregate_type != AGGREGATE_TYPE {
            return Err(DecodeError::invalid("aggregate_type", format!("expected `{AGGREGATE_TYPE}`")));
        }
        let aggregate_id: OrderId =
            entry.aggregate_id.parse().map_err(|_| DecodeError::invalid("aggregate_id", "not an order id (ULID)"))?;
        let event_type = EventType::parse(&entry.event_type)
            .ok_or_else(|| DecodeError::invalid("event_type", format!("unknown event type `{}`", entry.event_type)))?;
        let payload = EventPayload::from_json(event_type, &entry.payload)
            .map_err(|e| DecodeError::invalid("payload", e.to_string()))?;
        if payload.order_id() != aggregate_id {
            return Err(DecodeError::invalid("payload", "order_id differs from aggregate_id"));
        }
        Ok(Self {
            event_id: entry.event_id,
            aggregate_id,
            seq: entry.seq,
            occurred_at: entry.occurred_at,
            payload,
            traceparent: entry.traceparent.clone(),
            tracestate: entry.tracestate.clone(),
            tenant_id: entry.tenant_id.clone(),
        })
    }
}
