use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, PgExecutor, Postgres, Row};
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

/// Parameters a caller's own rows take in [`append_with`]: `$9` onwards.
pub const FIRST_CALLER_PARAM: usize = 9;

/// Appends `event` inside the caller's transaction.
///
/// The aggregate's counter row is bumped first; its row lock is held until the caller commits,
/// so a second writer to the same aggregate waits, then reads the committed value: seqs are
/// 1, 2, 3 … without gaps in commit order, and the outbox `id` (taken after the lock) grows
/// with `seq`. The trace context of the current span is stored with the event.
pub async fn append(conn: &mut PgConnection, event: NewEvent<'_>) -> Result<Appended, OutboxError> {
    append_with(conn, event, None, |q| q).await
}

/// [`append`], with the caller's own write in the same statement: `cte` is a data-modifying
/// common table expression (e.g. `created AS (INSERT INTO orders … VALUES ($9, $10 …))`)
/// whose parameters, from [`FIRST_CALLER_PARAM`] on, `bind` adds. One statement is atomic on
/// its own, so a caller with nothing else to write needs no explicit transaction: the state
/// change and its event commit together in one round trip.
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
pub async fn append_with<'c, E, F>(
    executor: E,
    event: NewEvent<'_>,
    cte: Option<&str>,
    bind: F,
) -> Result<Appended, OutboxError>
where
    E: PgExecutor<'c>,
    F: for<'q> FnOnce(Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments>,
{
    let event_id = Ulid::new();
    let (traceparent, tracestate) = telemetry::propagation::current_context_headers();
    let caller = cte.map(|c| format!("{c}, ")).unwrap_or_default();
    // The outer INSERT pulls the counter row from `bumped` before it evaluates its own row, so
    // the outbox id is taken after the counter's lock.
    let sql = format!(
        "WITH {caller}bumped AS (INSERT INTO outbox_sequences (aggregate_id, last_seq) VALUES ($3, 1) \
           ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_sequences.last_seq + 1 \
           RETURNING last_seq) \
         INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
                             traceparent, tracestate) \
         SELECT $1, $2, $3, bumped.last_seq, $4, $5::jsonb, $6, $7, $8 FROM bumped \
         RETURNING seq"
    );
    let query = sqlx::query(&sql)
        .bind(event_id.to_string())
        .bind(event.aggregate_type)
        .bind(event.aggregate_id)
        .bind(event.event_type)
        .bind(event.payload)
        .bind(event.occurred_at)
        .bind(traceparent)
        .bind(tracestate);
    let seq: i64 = bind(query).fetch_one(executor).await?.try_get(0)?;
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(event_id));
    span.record("seq", seq);
    Ok(Appended { event_id, seq })
}
