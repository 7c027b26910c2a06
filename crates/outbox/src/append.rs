use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::postgres::PgRow;
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
    /// Whether the event's transaction wakes the relays (a `NOTIFY` on [`crate::CHANNEL`] at
    /// its commit); see [`crate::Wake::carries`].
    pub notify: bool,
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
    let caller = cte.map(|c| format!("{c}, ")).unwrap_or_default();
    let sql = format!("WITH {caller}{} {INSERT_EVENT} {}", bump_sql(None), returning(&event));
    let (appended, _) = execute(executor, &event, &sql, bind).await?;
    // The statement returns the new row's seq, so an event was written.
    appended.ok_or(OutboxError::Database(sqlx::Error::RowNotFound))
}

/// [`append_with`] for a change that may not happen: the event is written only if the caller's
/// common table expression named `gate` (one of `ctes`, yielding at most one row) yields a row,
/// e.g. an `UPDATE … WHERE status = …` that matched. The statement ends with the caller's
/// `select`, which may read the caller's CTEs and `appended` (the outbox row's `seq`, if
/// written); its first row is returned, with the event's id and seq if the event was written.
/// A caller whose gate locks the aggregate's row first keeps every writer of that aggregate
/// in line, as [`append`]'s counter lock does.
pub async fn append_gated<'c, E, F>(
    executor: E,
    event: NewEvent<'_>,
    ctes: &str,
    gate: &str,
    select: &str,
    bind: F,
) -> Result<(Option<Appended>, PgRow), OutboxError>
where
    E: PgExecutor<'c>,
    F: for<'q> FnOnce(Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments>,
{
    let sql =
        format!("WITH {ctes}, {}, appended AS ({INSERT_EVENT} {}) {select}", bump_sql(Some(gate)), returning(&event));
    execute(executor, &event, &sql, bind).await
}

/// Runs an append statement whose first row has a `seq` column (null when no event was
/// written), in the span every append reports.
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
async fn execute<'c, E, F>(
    executor: E,
    event: &NewEvent<'_>,
    sql: &str,
    bind: F,
) -> Result<(Option<Appended>, PgRow), OutboxError>
where
    E: PgExecutor<'c>,
    F: for<'q> FnOnce(Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments>,
{
    let (event_id, query) = bind_event(sqlx::query(sql), event);
    let row = bind(query).fetch_one(executor).await?;
    let seq: Option<i64> = row.try_get("seq")?;
    let appended = seq.map(|seq| {
        let span = tracing::Span::current();
        span.record("event_id", tracing::field::display(event_id));
        span.record("seq", seq);
        Appended { event_id, seq }
    });
    Ok((appended, row))
}

/// The counter bump, as the CTE `bumped`; with a gate, only if the gate yields a row.
fn bump_sql(gate: Option<&str>) -> String {
    let row = match gate {
        None => "VALUES ($3, 1)".to_owned(),
        Some(gate) => format!("SELECT $3, 1 FROM {gate}"),
    };
    format!(
        "bumped AS (INSERT INTO outbox_sequences (aggregate_id, last_seq) {row} \
           ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = outbox_sequences.last_seq + 1 \
           RETURNING last_seq)"
    )
}

/// The outbox row, numbered by `bumped`. The INSERT pulls the counter row from `bumped` before
/// it evaluates its own row, so the outbox id is taken after the counter's lock.
const INSERT_EVENT: &str = "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, \
                                  occurred_at, traceparent, tracestate) \
     SELECT $1, $2, $3, bumped.last_seq, $4, $5::jsonb, $6, $7, $8 FROM bumped";

/// The outbox row's `RETURNING`: its seq, and the relays' notification if the event carries
/// it (evaluated only if the row is written, so it is sent only with the event). The
/// notification's payload is the row's id, so that relays can tell which of them takes it.
fn returning(event: &NewEvent<'_>) -> &'static str {
    if event.notify {
        concat!("RETURNING seq, pg_notify('", channel!(), "', id::text) AS notified")
    } else {
        "RETURNING seq"
    }
}

/// Binds `$1`..`$8`: a new event id, the event, and the current span's trace context.
fn bind_event<'q>(
    query: Query<'q, Postgres, PgArguments>,
    event: &NewEvent<'q>,
) -> (Ulid, Query<'q, Postgres, PgArguments>) {
    let event_id = Ulid::new();
    let (traceparent, tracestate) = telemetry::propagation::current_context_headers();
    let query = query
        .bind(event_id.to_string())
        .bind(event.aggregate_type)
        .bind(event.aggregate_id)
        .bind(event.event_type)
        .bind(event.payload)
        .bind(event.occurred_at)
        .bind(traceparent)
        .bind(tracestate);
    (event_id, query)
}
