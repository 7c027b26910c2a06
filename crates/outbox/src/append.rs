use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::PgRecordEncoder;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo};
use sqlx::{PgConnection, Postgres};
use tracing::Instrument;
use ulid::Ulid;

/// An event to append; `payload` is JSON.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub occurred_at: DateTime<Utc>,
    /// Whether the event's transaction wakes the relays (a `NOTIFY` on [`crate::CHANNEL`] at
    /// its commit); see [`crate::Wake::carries`].
    pub notify: bool,
}

impl<'a> NewEvent<'a> {
    /// The event with a new id, ready to be bound as the `event` argument of
    /// `outbox_append(event, seq)`. Its span (`outbox append`, a child of the current one) opens
    /// here, and its trace context is the one stored with the event, so the relay's publish
    /// span hangs under it; [`Stamped::run`] runs the statement in it.
    pub fn stamp(self) -> Stamped<'a> {
        let span = tracing::info_span!(
            "outbox append",
            aggregate_id = self.aggregate_id,
            event_type = self.event_type,
            event_id = tracing::field::Empty,
            seq = tracing::field::Empty,
            db.system = "postgresql",
            db.operation.name = "INSERT",
            db.collection.name = "outbox",
        );
        let (traceparent, tracestate) = span.in_scope(telemetry::propagation::current_context_headers);
        Stamped { event_id: Ulid::new(), event: self, traceparent, tracestate, span }
    }
}

/// A [`NewEvent`] stamped with its id and trace context. It binds as one parameter of the
/// Postgres type `outbox_new_event`.
#[derive(Debug, Clone)]
pub struct Stamped<'a> {
    event_id: Ulid,
    event: NewEvent<'a>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    span: tracing::Span,
}

/// What an append assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub event_id: Ulid,
    pub seq: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox write failed")]
    Database(#[from] sqlx::Error),
}

/// Appends `event`, numbered by the outbox, in a statement of its own (inside the caller's
/// transaction, if `conn` is in one).
///
/// The aggregate's counter row is bumped first; its row lock is held until the caller commits,
/// so a second writer to the same aggregate waits, then reads the committed value: seqs are
/// 1, 2, 3 … without gaps in commit order, and the outbox `id` (taken after the lock) grows
/// with `seq`. Not for an aggregate whose owner numbers its events ([`Stamped::run`]): the
/// counter knows nothing of those.
pub async fn append(conn: &mut PgConnection, event: NewEvent<'_>) -> Result<Appended, OutboxError> {
    let event = event.stamp();
    let seq = event.run(sqlx::query_scalar!("SELECT outbox_append($1, NULL)", &event as _).fetch_one(conn)).await?;
    // `outbox_append` returns the new row's seq, so an event was written.
    event.appended(seq).ok_or(OutboxError::Database(sqlx::Error::RowNotFound))
}

impl Stamped<'_> {
    /// Runs `statement` in the append's span: a whole statement of the caller's that changes
    /// its own rows and writes this event (bound among its parameters) with
    /// `outbox_append(event, seq)`, so the change and the event commit together, in one round
    /// trip without an explicit transaction.
    ///
    /// A caller numbering its aggregate's events passes `seq` from its own row, changed in the
    /// same statement under that row's lock (see `migrations/orders/0011_outbox_append.sql`).
    pub async fn run<T>(&self, statement: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, OutboxError> {
        Ok(statement.instrument(self.span.clone()).await?)
    }

    /// The event as written, given what the statement's `outbox_append` returned: the event's
    /// seq, or null where the statement wrote no event (a change that did not happen).
    pub fn appended(&self, seq: Option<i64>) -> Option<Appended> {
        let seq = seq?;
        self.span.record("event_id", tracing::field::display(self.event_id));
        self.span.record("seq", seq);
        Some(Appended { event_id: self.event_id, seq })
    }
}

impl sqlx::Type<Postgres> for Stamped<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("outbox_new_event")
    }
}

impl sqlx::Encode<'_, Postgres> for Stamped<'_> {
    /// The fields in the order of `outbox_new_event`.
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let event = &self.event;
        let mut record = PgRecordEncoder::new(buf);
        record
            .encode(self.event_id.to_string())?
            .encode(event.aggregate_type)?
            .encode(event.aggregate_id)?
            .encode(event.event_type)?
            .encode(event.payload)?
            .encode(event.occurred_at)?
            .encode(self.traceparent.as_deref())?
            .encode(self.tracestate.as_deref())?
            .encode(event.notify)?;
        record.finish();
        Ok(IsNull::No)
    }
}
