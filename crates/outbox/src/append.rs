use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use ulid::Ulid;

/// An event to append; `payload` is JSON.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub occurred_at: DateTime<Utc>,
}

/// What [`append`] assigned.
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

/// Appends `event` inside the caller's transaction.
///
/// The aggregate's counter row is bumped first; its row lock is held until the caller commits,
/// so a second writer to the same aggregate waits, then reads the committed value: seqs are
/// 1, 2, 3 … without gaps in commit order, and the outbox `id` (taken after the lock) grows
/// with `seq`. The trace context of the current span is stored with the event.
#[tracing::instrument(
    name = "outbox append",
    skip_all,
    fields(
        aggregate_id = event.aggregate_id,
        event_type = event.event_type,
        event_id = tracing::field::Empty,
        seq = tracing::field::Empty,
        db.system = "postgresql",
        db.operation.name = "INSERT",
        db.collection.name = "outbox",
    )
)]
pub async fn append(conn: &mut PgConnection, event: NewEvent<'_>) -> Result<Appended, OutboxError> {
    let event_id = Ulid::new();
    let (traceparent, tracestate) = telemetry::propagation::current_context_headers();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO outbox_sequences (aggregate_id, last_seq) VALUES ($1, 1) \
         ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_sequences.last_seq + 1 \
         RETURNING last_seq",
    )
    .bind(event.aggregate_id)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
         traceparent, tracestate) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)",
    )
    .bind(event_id.to_string())
    .bind(event.aggregate_type)
    .bind(event.aggregate_id)
    .bind(seq)
    .bind(event.event_type)
    .bind(event.payload)
    .bind(event.occurred_at)
    .bind(traceparent)
    .bind(tracestate)
    .execute(&mut *conn)
    .await?;
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(event_id));
    span.record("seq", seq);
    Ok(Appended { event_id, seq })
}
