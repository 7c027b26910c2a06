//! Publishing retained events again (e.g. after Redis lost data). Consumers deduplicate by
//! event_id.

use chrono::{DateTime, Utc};
use domain::StreamEntry;
use sqlx::PgPool;

use broker::publish::Publisher;
use outbox::row::OutboxRow;

/// Which retained events to publish again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only<'a> {
    All,
    /// One order's.
    Aggregate(&'a str),
    /// Those of one partition (of the publisher's partitions): what its stream lost.
    Partition(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading published events: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing: {0}")]
    Redis(#[from] broker::publish::PublishError),
}

/// Publishes events published at or after `since` (all, or `only` those of one aggregate or
/// partition) again, in id
/// order, `batch` per pipeline. Returns how many.
pub async fn replay(
    pool: &PgPool,
    publisher: &mut Publisher,
    since: DateTime<Utc>,
    only: Only<'_>,
    batch: u32,
) -> Result<u64, ReplayError> {
    let aggregate_id = match only {
        Only::Aggregate(id) => Some(id),
        Only::All | Only::Partition(_) => None,
    };
    let mut after = 0_i64;
    let mut total = 0_u64;
    loop {
        let rows: Vec<OutboxRow> = outbox::published::page(pool, since, aggregate_id, after, batch).await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        // Rows got here by being published, so they encode; a limit of usize::MAX skips the
        // size check that applies to new events.
        let mut entries: Vec<StreamEntry> = Vec::with_capacity(rows.len());
        let in_partition = |row: &&OutboxRow| match only {
            Only::Partition(p) => publisher.partitions().of(&row.aggregate_id) == p,
            Only::All | Only::Aggregate(_) => true,
        };
        for row in rows.iter().filter(in_partition) {
            match row.to_entry(usize::MAX) {
                Ok(entry) => entries.push(entry),
                Err(reason) => tracing::warn!(
                    event_id = row.event_id,
                    aggregate_id = row.aggregate_id,
                    seq = row.seq,
                    reason,
                    "retained event cannot be encoded; skipped"
                ),
            }
        }
        publisher.publish(&entries).await?;
        total += entries.len() as u64;
        tracing::info!(replayed = total, last_id = after, "replayed a batch");
        if rows.len() < batch as usize {
            break;
        }
    }
    Ok(total)
}
