//! Claiming due rows: a transaction that holds their row locks while the batch is published.
//!
//! A claim is a lease. Its rows are locked by the claim's transaction, which no other relay can
//! take over while it lives, and the database ends it (rolling back, so the rows are free again)
//! once it has sat idle for the lease: every relay connection runs with
//! `idle_in_transaction_session_timeout` set to the lease (the relay's `OUTBOX_LEASE`). Recording
//! a batch as published is the commit of that same transaction, so a relay that was paused past
//! its lease cannot record anything: its transaction is gone. Failures are recorded after the
//! rollback, fenced by row lock and attempt count ([`crate::failures`]).

use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Connection, Executor, FromRow, PgConnection, Row};

use crate::row::OutboxRow;

/// The claim, in one statement:
///
/// - `locked`: free rows in id order, skipping rows another claim holds, and rows with an
///   earlier row of their aggregate that is not free (backing off or dead).
/// - `accepted`: a row is taken only if every earlier row of its aggregate still in the outbox
///   (as this statement sees it) is locked here too, so it goes out after them in this batch.
///   That count is taken for locked rows only: rows skipped because another claim holds them
///   cost one index probe, not two. A row whose earlier row is in another claim's batch
///   (in flight) is left alone; it stays locked until this transaction ends and is claimed
///   again after that batch is done.
/// - `moved`: accepted rows move to `outbox_published` inside the claim's transaction. The
///   move becomes visible only if the batch is published and the transaction commits.
///
/// Each returned row also carries the number of rows locked, so a batch filled with rows that
/// had to wait still counts as full.
///
/// The plan must not depend on how fresh the table's statistics are: a claim that scans and
/// sorts the whole outbox costs milliseconds per call and grows with the table. The claim runs
/// without sequential scans ([`BEGIN_CLAIM`]), so `ORDER BY id LIMIT` walks the primary key and
/// stops after the batch. The held-back check is an anti-join probing the tiny
/// `outbox_held_back_idx` (migration 0007). The earlier-row count of `accepted` probes the
/// `(aggregate_id, seq)` index once per locked row (an order rarely has more than a few rows in
/// the outbox).
pub const CLAIM_SQL: &str = include_str!("sql/claim.sql");

/// Starts a claim's transaction, in the same round trip as `BEGIN`: the claim must walk the
/// primary key whatever the statistics say ([`CLAIM_SQL`]). A planner that believes the outbox
/// is small (statistics taken when it was, and not refreshed since) otherwise scans and sorts
/// the whole table on every claim, however many rows it has by now.
pub const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL enable_seqscan = off";

/// The name [`CLAIM_SQL`] is prepared under on every claim connection.
const PREPARED_CLAIM: &str = "outbox_claim";

/// A connection that claims: opened with the relay's settings, with
/// [`CLAIM_SQL`] prepared on the server, so that a claim is one round trip: `BEGIN`, the
/// planner setting and the claim travel as one simple query. A finished claim hands its
/// connection back; one that failed or was dropped closes it, which ends its transaction.
#[derive(Debug)]
pub struct ClaimConnection(PgConnection);

impl ClaimConnection {
    /// Connects and prepares the claim.
    pub async fn connect(options: &PgConnectOptions) -> Result<Self, sqlx::Error> {
        let mut conn = PgConnection::connect_with(options).await?;
        conn.execute(format!("PREPARE {PREPARED_CLAIM}(bigint) AS {CLAIM_SQL}").as_str()).await?;
        Ok(Self(conn))
    }
}

/// Rows claimed by one transaction. Dropping a claim closes its connection, which rolls it
/// back.
#[derive(Debug)]
pub struct Claim {
    conn: ClaimConnection,
    /// In id order; an aggregate's rows are in seq order.
    pub rows: Vec<OutboxRow>,
    /// Rows locked, including rows left for later because an earlier row of their aggregate
    /// was in another claim's batch.
    pub locked: usize,
}

impl Claim {
    /// Records the batch as published. Fails if the lease ran out (the transaction is gone and
    /// the rows are someone else's now).
    pub async fn commit(self) -> Result<ClaimConnection, sqlx::Error> {
        self.end("COMMIT").await
    }

    /// Gives the rows back unchanged.
    pub async fn rollback(self) -> Result<ClaimConnection, sqlx::Error> {
        self.end("ROLLBACK").await
    }

    async fn end(self, statement: &'static str) -> Result<ClaimConnection, sqlx::Error> {
        let mut conn = self.conn;
        conn.0.execute(statement).await?;
        Ok(conn)
    }
}

/// Claims up to `limit` due rows on `conn`, in one round trip.
#[tracing::instrument(name = "outbox claim", level = "debug", skip(conn), fields(claimed = tracing::field::Empty))]
pub async fn claim_batch(mut conn: ClaimConnection, limit: u32) -> Result<Claim, sqlx::Error> {
    let sql = format!("{BEGIN_CLAIM}; EXECUTE {PREPARED_CLAIM}({limit})");
    // A simple query: the rows come back as text, which decodes to the same types.
    let found: Vec<PgRow> = conn.0.fetch_all(sql.as_str()).await?;
    let mut locked = 0_i64;
    let mut rows = Vec::with_capacity(found.len());
    for row in &found {
        locked = row.try_get("locked")?;
        if row.try_get::<Option<i64>, _>("id")?.is_some() {
            rows.push(OutboxRow::from_row(row)?);
        }
    }
    // RETURNING keeps no order.
    rows.sort_unstable_by_key(|r| r.id);
    tracing::Span::current().record("claimed", rows.len());
    Ok(Claim { conn, rows, locked: usize::try_from(locked).unwrap_or(0) })
}
