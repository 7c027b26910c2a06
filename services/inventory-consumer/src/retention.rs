//! Pruning the dedupe and ordering state older than `DEDUPE_RETENTION`, in bounded batches:
//! `processed_messages` rows older than the retention, the checkpoint and reservation of each
//! closed order whose latest applied event is, and counted entry failures last seen before it. Nothing can then apply twice because an
//! event older than the retention is never applied ([`crate::apply`] dead-letters it as
//! expired); the whole argument is in docs/RELIABILITY.md, "Bounded state".

use std::time::Duration;

use service_kit::prune::pass_interval;
use service_kit::Shutdown;
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::store;
use crate::store::prune::ParkedSample;

/// Statements per table per round: a larger backlog takes several rounds.
const STATEMENTS: u32 = 100;

/// What one round removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub processed: u64,
    /// Checkpoints of closed orders, each with its reservation.
    pub closed_orders: u64,
    /// Counted failures of entries that failed last before the retention.
    pub entry_failures: u64,
}

/// One round: dedupe rows, then closed orders. Rows another replica is removing are skipped.
pub async fn prune(pool: &PgPool, retention: Duration, shutdown: &Shutdown) -> Result<Pruned, sqlx::Error> {
    let processed = store::prune::processed(pool, retention, STATEMENTS, shutdown).await?;
    let closed_orders = store::prune::closed_orders(pool, retention, STATEMENTS, shutdown).await?;
    // An entry still failing fails again within the claim interval; one that has not for a
    // whole retention was settled without its count being cleared (it left the stream, or
    // another replica applied it), and a count pruned too early only allows more tries.
    let entry_failures = store::entry_failures::prune(pool, retention, STATEMENTS, shutdown).await?;
    Ok(Pruned { processed, closed_orders, entry_failures })
}

/// What the pruning loop keeps and watches.
#[derive(Debug, Clone, Copy)]
pub struct RetentionSettings {
    /// `DEDUPE_RETENTION`.
    pub dedupe: Duration,
    /// `DEAD_LETTER_RETENTION`.
    pub dead_letters: Duration,
    /// `PARKED_WARN_AFTER`.
    pub parked_warn_after: Duration,
}

/// Every [`pass_interval`] of the shorter retention until shutdown: prunes dedupe state and
/// old dead letters, counting what went, and samples the parked events, warning of one that
/// has waited past `parked_warn_after` (a gap that is not filling).
pub async fn prune_loop(pool: PgPool, settings: RetentionSettings, metrics: Metrics, shutdown: Shutdown) {
    let every = pass_interval(settings.dedupe.min(settings.dead_letters));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match prune(&pool, settings.dedupe, &shutdown).await {
            Ok(p) => {
                metrics.pruned_processed.inc_by(p.processed);
                metrics.pruned_closed_orders.inc_by(p.closed_orders);
                if p != Pruned::default() {
                    tracing::debug!(
                        processed = p.processed,
                        closed_orders = p.closed_orders,
                        entry_failures = p.entry_failures,
                        "pruned dedupe state"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "pruning dedupe state failed; trying again next round"),
        }
        match store::dead_letters::purge(&pool, settings.dead_letters, STATEMENTS, &shutdown).await {
            Ok(n) => {
                metrics.pruned_dead_letters.inc_by(n);
            }
            Err(e) => tracing::debug!(error = %e, "removing old dead letters failed; trying again next round"),
        }
        match store::prune::parked(&pool).await {
            Ok(parked) => watch_parked(&metrics, parked, settings.parked_warn_after),
            Err(e) => tracing::debug!(error = %e, "sampling parked events failed"),
        }
    }
}

fn watch_parked(metrics: &Metrics, parked: ParkedSample, warn_after: Duration) {
    metrics.parked.set(parked.count);
    let age = parked.oldest.as_ref().map_or(0.0, |(_, _, age)| age.max(0.0));
    metrics.parked_oldest_age_seconds.set(age);
    if let Some((aggregate_id, seq, age)) = parked.oldest {
        if age >= warn_after.as_secs_f64() {
            tracing::warn!(
                aggregate_id,
                seq,
                waited_s = age as u64,
                parked = parked.count,
                "an event has waited past PARKED_WARN_AFTER for the one before it: a gap that is not filling \
                 (that event lost, dead-lettered or expired upstream?)"
            );
        }
    }
}
