//! An outbox row as the relay reads it, and its stream entry.

use chrono::{DateTime, Utc};
use domain::{StreamEntry, TenantId};
use ulid::Ulid;

/// The columns of an [`OutboxRow`], for reads built at run time (tests). The claim
/// (`sql/claim.sql`) and [`crate::published::page`] name them in their own statements.
pub const EVENT_COLUMNS: &str =
    "id, event_id, aggregate_type, aggregate_id, seq, event_type, payload::text AS payload, \
     occurred_at, traceparent, tracestate, attempts, created_at, tenant_id";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub seq: i64,
    pub event_type: String,
    /// JSON text.
    pub payload: String,
    pub occurred_at: DateTime<Utc>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// Failed attempts so far.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub tenant_id: String,
}

impl OutboxRow {
    /// The stream entry, or why this row can never be published.
    pub fn to_entry(&self, max_payload_bytes: usize) -> Result<StreamEntry, String> {
        if self.payload.len() > max_payload_bytes {
            return Err(format!("payload is {} bytes, over the limit of {max_payload_bytes}", self.payload.len()));
        }
        let event_id =
            Ulid::from_string(&self.event_id).map_err(|_| format!("event_id `{}` is not a ULID", self.event_id))?;
        if self.aggregate_id.is_empty() || self.event_type.is_empty() || self.aggregate_type.is_empty() {
            return Err("aggregate_id, aggregate_type and event_type must not be empty".to_owned());
        }
        let tenant_id = TenantId::parse(self.tenant_id.as_str())
            .map_err(|_| format!("tenant_id `{}` does not match [a-z0-9][a-z0-9-]{{0,63}}", self.tenant_id))?;
        Ok(StreamEntry {
            event_id,
            event_type: self.event_type.clone(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            seq: self.seq,
            occurred_at: self.occurred_at,
            payload: self.payload.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            tenant_id,
        })
    }
}
