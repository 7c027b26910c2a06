//! Claiming due rows under a lease.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::row::{OutboxRow, EVENT_COLUMNS};

/// Serialises claims (transaction-scoped advisory lock; the value spells "outbox").
const CLAIM_LOCK: i64 = 0x6f75_7462_6f78;

/// Rows leased to one claim. `token` fences every later update: only rows still leased to it
/// are touched.
#[derive(Debug)]
pub struct Claim {
    pub token: Uuid,
    /// In id order; an aggregate's rows are in seq order.
    pub rows: Vec<OutboxRow>,
}

/// A row is "free" when it is pending, due and not leased (or its lease expired).
///
/// A row never attempted is always due. Its `next_attempt_at` defaults to its writer's
/// transaction start, which can be later than this claim's `now()` (the claim's transaction
/// starts before it waits for the advisory lock) even though the row committed before the
/// claim's snapshot; judging such a row "not due" would let its aggregate's next row, written
/// by a transaction that started earlier, go out ahead of it.
macro_rules! free {
    ($t:literal) => {
        concat!(
            $t,
            ".status = 'pending' AND (",
            $t,
            ".attempts = 0 OR ",
            $t,
            ".next_attempt_at <= now()) AND (",
            $t,
            ".lease_expires_at IS NULL OR ",
            $t,
            ".lease_expires_at < now())"
        )
    };
}

/// The claim. A row is taken only if every earlier row of its aggregate still in the outbox
/// is free too (and so, being earlier in id order, taken in the same batch or already moved):
/// an aggregate's later events wait while an earlier one is in flight elsewhere, backing off
/// or dead, which keeps each aggregate's events in seq order on the stream.
///
/// The check probes the `(aggregate_id, seq)` unique index for the candidate's earlier rows
/// (an order rarely has more than a few in the outbox). No index mentions the lease columns, so
/// leasing a row is a HOT update (`outbox` keeps free space on its pages). It is written as a
/// scalar subquery rather than `NOT EXISTS` so the planner keeps it a per-row probe instead of
/// materialising every blocking row and comparing each candidate against all of them.
const CLAIM_SQL: &str = concat!(
    "UPDATE outbox SET lease_owner = $1, lease_expires_at = now() + $2 * interval '1 millisecond' \
     WHERE id IN (SELECT o.id FROM outbox o WHERE ",
    free!("o"),
    " AND (SELECT 1 FROM outbox e WHERE e.aggregate_id = o.aggregate_id AND e.seq < o.seq \
       AND NOT (",
    free!("e"),
    ") LIMIT 1) IS NULL ORDER BY o.id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING "
);

/// Leases up to `limit` due rows for `lease` (database clock) under a fresh token.
///
/// Claims run one at a time (advisory lock): the claim's statement snapshot, taken after the
/// lock, sees the leases of every earlier claim, so two relays can never take rows of one
/// aggregate out of order. A claim holds the lock for a few milliseconds only.
#[tracing::instrument(name = "outbox claim", level = "debug", skip(pool), fields(claimed = tracing::field::Empty))]
pub async fn claim_batch(pool: &PgPool, lease: Duration, limit: u32) -> Result<Claim, sqlx::Error> {
    let token = Uuid::new_v4();
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    // The planner's estimate for this statement is high enough to trigger JIT compilation,
    // which costs far more than the claim itself.
    sqlx::query("SELECT set_config('jit', 'off', true), pg_advisory_xact_lock($1)")
        .bind(CLAIM_LOCK)
        .execute(&mut *tx)
        .await?;
    let mut rows: Vec<OutboxRow> = sqlx::query_as(&format!("{CLAIM_SQL}{EVENT_COLUMNS}"))
        .bind(token)
        .bind(lease_ms as f64)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    // RETURNING does not keep the subquery's order.
    rows.sort_unstable_by_key(|r| r.id);
    tracing::Span::current().record("claimed", rows.len());
    Ok(Claim { token, rows })
}
